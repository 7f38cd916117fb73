"""The ``bvpo`` Typer app and what every command shares: one-line errors, config options, row output.

Command modules (``flows/cli/*.py``) import :data:`app` and register their commands on it; see
``flows/cli/__init__.py`` for the list.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer.rich_utils as typer_rich_utils
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.config import PipelineConfig, load_config

app = typer.Typer(
    help="BVPO pipeline: vLLM generation → scoring → pairing → BVPO training → evaluation, on Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config value, e.g. --set train.alpha=1.0")
]
WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace holding the catalog.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")]


def fail(exc: BaseException, debug: bool) -> None:
    """Print ``exc`` as one line (``error: ...``) and exit 1; with ``--debug``, raise it (full traceback)."""
    if debug:
        raise exc
    err.print(Text.assemble(("error:", "red"), f" {error_line(exc)}"), soft_wrap=True)
    raise typer.Exit(code=1)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: config errors name each bad key, long messages keep their first line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item["loc"])
            what = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{where}: {what}" if where else what)
        return "invalid config: " + "; ".join(problems)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] + (" (--debug shows the rest)" if len(lines) > 1 else "")


def _one_line_usage_error(exc: click.ClickException) -> None:
    """Typer's usage errors (missing argument, unknown option) as one line instead of a framed panel."""
    if exc.__class__.__name__ == "NoArgsIsHelpError":  # `bvpo` alone prints the help instead
        return
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    err.print(Text.assemble(("error:", "red"), f" {exc.format_message()}{hint}"), soft_wrap=True)


typer_rich_utils.rich_format_error = _one_line_usage_error  # type: ignore[assignment]


def pipeline_config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    """Defaults, then ``--config FILE``, then ``--set`` overrides."""
    return load_config(config, overrides or [])


def prepare_flow_process() -> None:
    """Environment defaults for a command that runs flows in this process (the user's own values win)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without PREFECT_API_URL, Prefect starts a temporary server and gives it 20 s by default: on a busy
    # 2-core machine it can need more (seen: "Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # SIGTERM (kill, a scheduler's stop) ends the process through SystemExit, so exit handlers run: the
    # temporary Prefect server is stopped with it instead of being left running without a parent.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def print_rows(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    """Rows as tab-separated text when stdout is not a terminal, else as a table."""
    if not sys.stdout.isatty():
        print("\t".join(columns))
        for row in rows:
            print("\t".join("" if v is None else str(v) for v in row))
        return
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)
