"""Evaluation: held-out prompts, both reasoning modes, the same scorers, bootstrap intervals."""
