"""Interop with the tools users already have: preference pairs in and out (TRL's preference format)."""
