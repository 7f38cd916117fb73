"""The ``bvpo`` command line: run the pipeline, inspect datasets with SQL."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
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


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    err.print(Text.assemble(("error:", "red"), f" {exc}"), soft_wrap=True)
    raise typer.Exit(code=1)


def _config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config, overrides or [])


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Run the whole pipeline (data refresh, BVPO training, evaluation) as one Prefect flow.

    Examples:
      bvpo run
      bvpo run --config configs/tiny.yaml --set train.alpha=1.0
    """
    try:
        cfg = _config(config, set_)
    except Exception as exc:
        _fail(exc, debug)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flows.pipeline import bvpo_pipeline

    try:
        out = bvpo_pipeline(cfg)
    except Exception as exc:
        _fail(exc, debug)
        return
    print_summary(out.summary)


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="Datasets")
    for column in ("kind", "version", "rows"):
        table.add_column(column)
    for kind, data in summary["datasets"].items():
        table.add_row(kind, data["name"], str(data["rows"]))
    console.print(table)
    console.print(
        f"Pairs: D_t (reasoning on) {summary['pairs']['trace']}, "
        f"D_e (reasoning off) {summary['pairs']['empty']}"
    )
    loss = summary["loss"]
    console.print(f"BVPO loss: {loss['first']:.4f} → {loss['last']:.4f} over {loss['steps']} steps")
    for mode, values in summary["eval"].items():
        ref, trained = values.get("reference"), values.get("trained")
        console.print(f"Eval score ({mode}): reference {ref:.3f} → trained {trained:.3f}")
    console.print(f"Checkpoint: {summary['checkpoint']}")
    console.print(f"Catalog:    {summary['paths']['catalog']}")
    workspace = summary["paths"]["workspace"]
    console.print("\nInspect the datasets:")
    for kind in summary["datasets"]:
        console.print(f'  bvpo sql -w {workspace} "select * from {kind} limit 5"')


class SqlFormat(StrEnum):
    """Output formats of ``bvpo sql``."""

    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A read-only SQL query over the dataset views.")],
    workspace: WorkspaceOpt = Path("workspace"),
    format_: Annotated[
        SqlFormat,
        typer.Option("--format", "-f", help="table (terminal), csv, json (array of rows) or parquet."),
    ] = SqlFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result to FILE (csv, json, parquet).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Run a read-only SQL query over the catalog (one view per dataset kind, plus kind__v<N>).

    Only SELECT (and EXPLAIN of a SELECT) runs; anything that could write is refused with exit code 1.

    Examples:
      bvpo sql "select count(*) from generations"
      bvpo sql "select mode, avg(score) from scores group by mode"
      bvpo sql "select * from pairs_trace" --format parquet --output pairs.parquet
      bvpo sql "select * from datasets" --format json
    """
    from storage import DatasetStore, QueryRefused, run_readonly_arrow, write_result

    if format_ is SqlFormat.table and output is not None:
        err.print("[red]error:[/red] --output needs --format csv, json or parquet")
        raise typer.Exit(code=2)
    if format_ is SqlFormat.parquet and output is None:
        err.print("[red]error:[/red] --format parquet needs --output FILE")
        raise typer.Exit(code=2)
    store = DatasetStore(workspace)
    try:
        result = run_readonly_arrow(store.catalog, store.lake, query)
    except QueryRefused as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except Exception as exc:
        _fail(exc, debug)
        return
    if format_ is SqlFormat.table:
        columns = [c.to_pylist() for c in result.columns]
        _print_rows(result.column_names, list(zip(*columns, strict=True)) if columns else [])
        return
    try:
        write_result(result, format_.value, output, None if output else sys.stdout.buffer)
    except Exception as exc:
        _fail(exc, debug)
        return
    if output is not None:
        err.print(f"wrote {result.num_rows} rows to {output}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def datasets(workspace: WorkspaceOpt = Path("workspace"), debug: DebugOpt = False) -> None:
    """List every registered dataset version.

    Example:
      bvpo datasets
    """
    from storage import DatasetStore

    try:
        rows = DatasetStore(workspace).catalog.list_datasets()
    except Exception as exc:
        _fail(exc, debug)
        return
    columns = ["name", "kind", "version", "row_count", "created_at"]
    _print_rows(columns, [tuple(r[c] for c in columns) for r in rows])


@app.command()
def lineage(
    dataset: Annotated[
        str, typer.Argument(help="kind (latest), kind__v<N>, kind:<version> or a version id.")
    ],
    workspace: WorkspaceOpt = Path("workspace"),
    debug: DebugOpt = False,
) -> None:
    """Print the chain of datasets (with their configs) that produced DATASET, back to the prompts.

    Examples:
      bvpo lineage eval_results
      bvpo lineage pairs_trace__v2
    """
    import json

    from storage import DatasetStore

    catalog = DatasetStore(workspace).catalog
    try:
        chain = catalog.lineage(catalog.resolve(dataset))
    except Exception as exc:
        _fail(exc, debug)
        return
    for depth, ref, config in chain:
        indent = "  " * depth
        console.print(f"{indent}[bold]{ref.name}[/bold] ({ref.version}, {ref.row_count} rows)")
        console.print(
            f"{indent}  config: {json.dumps(config, sort_keys=True)}", markup=False, highlight=False
        )


def _print_rows(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
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


if __name__ == "__main__":
    app()
