"""The ``bvpo`` command line (entry point ``flows.cli:app``).

One module per concern, each registering its commands on the shared :data:`app`:

- ``app.py``: the Typer app, one-line error handling, shared options and row output;
- ``run.py``: ``run``, ``config``;
- ``analysis.py``: ``report``, ``analyze-variance``, ``lm-eval``;
- ``server.py``: ``server``, ``serve``, ``deploy``;
- ``data.py``: ``sql``, ``datasets``, ``lineage``, ``compare``, ``export`` (eval answers);
- ``interop.py``: ``import pairs``, ``export pairs`` (preference pairs in and out, TRL's format);
- ``study.py``: ``study`` (an α grid × seeds on shared data, paired intervals, MDE).

A new command (or a Typer sub-group added with ``app.add_typer``) is a new module here that imports
``app`` from ``flows.cli.app``, plus one import line below. Commands import Prefect, torch and
the flows lazily, inside the command, so ``bvpo --help`` and the data commands start fast.
"""

from __future__ import annotations

from flows.cli.app import app, error_line

# Registration: importing a module registers its commands (in this order in `bvpo --help`).
# isort: off
from flows.cli import run  # noqa: F401
from flows.cli import analysis  # noqa: F401
from flows.cli import server  # noqa: F401
from flows.cli import data  # noqa: F401
from flows.cli import interop  # noqa: F401
from flows.cli import study  # noqa: F401
# isort: on

from flows.cli.analysis import analyze_variance

__all__ = ["analyze_variance", "app", "error_line"]
