"""Data commands: `bvpo sql`, `bvpo datasets`, `bvpo lineage`, `bvpo compare`, `bvpo export`."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.app import DebugOpt, WorkspaceOpt, app, console, err, fail, print_rows


class SqlFormat(StrEnum):
    """Output formats of ``bvpo sql``."""

    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


DEFAULT_MAX_ROWS = 40
"""Rows the terminal table of ``bvpo sql`` shows; the rest are counted and the footer says how to get them."""


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[
        str | None,
        typer.Argument(help="A read-only SQL query over the dataset views; '-' reads it from stdin."),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Read the query from FILE ('-': from stdin).")
    ] = None,
    workspace: WorkspaceOpt = Path("workspace"),
    format_: Annotated[
        SqlFormat,
        typer.Option("--format", "-f", help="table (terminal), csv, json (array of rows) or parquet."),
    ] = SqlFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result to FILE (csv, json, parquet).")
    ] = None,
    max_rows: Annotated[
        int,
        typer.Option(
            "--max-rows", min=1, help="Rows the table shows; the others are counted (csv/json/parquet: all)."
        ),
    ] = DEFAULT_MAX_ROWS,
    debug: DebugOpt = False,
) -> None:
    """Run a read-only SQL query over the catalog (one view per dataset kind, plus kind__v<N>).

    Only SELECT (and EXPLAIN of a SELECT) runs; anything that could write is refused with exit code 1.
    The query comes as an argument, from a file (--file) or from stdin ('-'). The table shows the first
    --max-rows rows and says how many it left out; --format csv/json/parquet gives every row.

    Examples:
      bvpo sql "select count(*) from generations"
      bvpo sql "select mode, avg(score) from scores group by mode"
      bvpo sql --file query.sql --format csv --output result.csv
      echo "select * from prompts" | bvpo sql - --max-rows 10
      bvpo sql "select * from pairs_trace" --format parquet --output pairs.parquet
      bvpo sql "select * from datasets" --format json
    """
    from storage import DatasetStore, QueryRefused, run_readonly_arrow, run_readonly_preview, write_result

    if format_ is SqlFormat.table and output is not None:
        err.print("[red]error:[/red] --output needs --format csv, json or parquet")
        raise typer.Exit(code=2)
    if format_ is SqlFormat.parquet and output is None:
        err.print("[red]error:[/red] --format parquet needs --output FILE")
        raise typer.Exit(code=2)
    text = _query_text(ctx, query, file)
    store = DatasetStore(workspace)
    total = 0
    try:
        if format_ is SqlFormat.table:
            result, total = run_readonly_preview(store.catalog, store.lake, text, max_rows)
        else:
            result = run_readonly_arrow(store.catalog, store.lake, text)
    except QueryRefused as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except Exception as exc:
        fail(exc, debug)
        return
    if format_ is SqlFormat.table:
        columns = [c.to_pylist() for c in result.columns]
        print_rows(result.column_names, list(zip(*columns, strict=True)) if columns else [])
        if total > result.num_rows:
            err.print(_left_out_line(result.num_rows, total), markup=False, highlight=False, soft_wrap=True)
        return
    try:
        write_result(result, format_.value, output, None if output else sys.stdout.buffer)
    except Exception as exc:
        fail(exc, debug)
        return
    if output is not None:
        err.print(f"wrote {result.num_rows} rows to {output}", markup=False, highlight=False, soft_wrap=True)


def _query_text(ctx: typer.Context, query: str | None, file: Path | None) -> str:
    """The query from the argument, ``--file`` or stdin (``-``); a usage error unless exactly one is given."""
    if query is None and file is None:
        ctx.fail("Missing argument 'QUERY' (or --file PATH, or '-' for stdin).")
    if query is not None and file is not None:
        ctx.fail("both a query and --file: give one of them")
    if query is not None and query != "-":
        text = query
    elif file is not None and str(file) != "-":
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot read the query file {file}: {exc.strerror or exc}")
            raise typer.Exit(code=2) from None
    else:
        text = sys.stdin.read()
    if not text.strip():
        err.print("[red]error:[/red] the query is empty")
        raise typer.Exit(code=2)
    return text


def _left_out_line(shown: int, total: int) -> str:
    """The footer under a truncated table: how many rows were left out and how to get them all."""
    return (
        f"… {total - shown:,} more row(s) not shown ({shown:,} of {total:,}). All rows: --format csv or "
        "json (stdout), or --format csv|json|parquet --output FILE; more on screen: --max-rows N."
    )


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
        fail(exc, debug)
        return
    columns = ["name", "kind", "version", "row_count", "created_at"]
    print_rows(columns, [tuple(r[c] for c in columns) for r in rows])


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
        fail(exc, debug)
        return
    for depth, ref, config in chain:
        indent = "  " * depth
        console.print(f"{indent}[bold]{ref.name}[/bold] ({ref.version}, {ref.row_count} rows)")
        console.print(
            f"{indent}  config: {json.dumps(config, sort_keys=True)}", markup=False, highlight=False
        )


@app.command()
def compare(
    runs: Annotated[
        list[str] | None,
        typer.Argument(
            help="eval_results datasets (eval_results, eval_results__v2, a version id) or the flow run ids "
            "of evaluate runs; default: the latest eval_results."
        ),
    ] = None,
    workspace: WorkspaceOpt = Path("workspace"),
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Also write OUTPUT.md and OUTPUT.png (and OUTPUT-rounds.png, the score per training "
            "round, when the models span more than one round).",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Compare evaluations: every model and mode with 95% intervals, as a Markdown table (and a PNG).

    The table has a round column (the training round of each model, 0 for the base model) when the
    compared models span more than one round, e.g. one evaluation per round of recurring refreshes.

    Examples:
      bvpo compare
      bvpo compare eval_results__v1 eval_results__v2 --output reports/v1-vs-v2
    """
    from pipeline.evaluation.report import (
        comparison_markdown,
        merge_runs,
        rounds_chart_path,
        rounds_compared,
        write_comparison_report,
    )
    from storage import DatasetStore

    try:
        store = DatasetStore(workspace)
        refs = [_eval_results_of(store, run) for run in runs or ["eval_results"]]
        rows = merge_runs({ref.name: store.read_rows(ref) for ref in refs})
        if not rows:
            raise ValueError("the selected eval_results hold no rows")
        console.print(comparison_markdown(rows), markup=False, highlight=False)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            markdown, chart = write_comparison_report(
                rows, output, title="Comparison of " + ", ".join(r.name for r in refs)
            )
            by_round = f" and {rounds_chart_path(output)}" if len(rounds_compared(rows)) > 1 else ""
            console.print(f"wrote {markdown}, {chart}{by_round}", markup=False)
    except Exception as exc:
        fail(exc, debug)


def _eval_results_of(store: Any, run: str) -> Any:
    """The eval_results dataset named by ``run``: a dataset name/version, or the flow run that made it."""
    from storage import CatalogError

    if not store.catalog.path.exists():
        raise ValueError(f"no catalog at {store.catalog.path}: run `bvpo run` first")
    try:
        ref = store.catalog.resolve(run)
    except CatalogError:
        made = [
            r
            for r in store.catalog.list_datasets()
            if r["kind"] == "eval_results" and r["flow_run_id"] == run
        ]
        if not made:
            raise ValueError(
                f"'{run}' is neither a dataset nor the flow run of an evaluation in {store.workspace} "
                "(see `bvpo datasets`)"
            ) from None
        ref = store.catalog.resolve(made[-1]["name"])
    if ref.kind != "eval_results":
        raise ValueError(f"'{run}' is a {ref.kind} dataset; compare takes eval_results datasets")
    return ref


class ExportFormat(StrEnum):
    alpaca_eval = "alpaca-eval"
    arena_hard = "arena-hard"


export_app = typer.Typer(
    help="Export for other tools: eval answers (AlpacaEval, Arena-Hard), preference pairs (TRL).\n\n"
    "Examples:\n\n"
    "  bvpo export alpaca-eval -o out/trained.json\n\n"
    "  bvpo export pairs -o pairs/",
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")

OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="File to write.")]
LabelOpt = Annotated[str, typer.Option(help="Model label in eval_generations (reference, trained, …).")]
ModeOpt = Annotated[str, typer.Option(help="Reasoning mode: trace (on) or empty (off).")]
EvalSetOpt = Annotated[str, typer.Option(help="The eval_generations dataset holding the answers.")]


@export_app.command("alpaca-eval")
def export_alpaca_eval(
    output: OutputOpt,
    label: LabelOpt = "trained",
    mode: ModeOpt = "trace",
    dataset: EvalSetOpt = "",
    workspace: WorkspaceOpt = Path("workspace"),
    debug: DebugOpt = False,
) -> None:
    """A model's eval answers for AlpacaEval, as a JSON list (final answers only, first sample).

    Example: bvpo export alpaca-eval -o out/trained.json
    """
    export(ExportFormat.alpaca_eval, output, label, mode, dataset, workspace, debug)


@export_app.command("arena-hard")
def export_arena_hard(
    output: OutputOpt,
    label: LabelOpt = "trained",
    mode: ModeOpt = "trace",
    dataset: EvalSetOpt = "",
    workspace: WorkspaceOpt = Path("workspace"),
    debug: DebugOpt = False,
) -> None:
    """A model's eval answers for Arena-Hard, as JSONL (final answers only, first sample).

    Example: bvpo export arena-hard --label reference --mode empty -o out/reference.jsonl
    """
    export(ExportFormat.arena_hard, output, label, mode, dataset, workspace, debug)


def export(
    fmt: ExportFormat, output: Path, label: str, mode: str, dataset: str, workspace: Path, debug: bool
) -> None:
    """Export a model's eval answers for AlpacaEval or Arena-Hard (final answers only, first sample)."""
    from pipeline.evaluation import export as exporters
    from storage import DatasetStore

    try:
        store = DatasetStore(workspace)
        refs = [store.catalog.resolve(dataset)] if dataset else _eval_generation_sets(store, label)
        rows = [
            r for ref in refs for r in store.read_rows(ref) if r["model_label"] == label and r["mode"] == mode
        ]
        if not rows:
            raise ValueError(
                f"no eval answers of '{label}' in mode '{mode}' (see `bvpo sql` on eval_generations)"
            )
        model = rows[0]["model"]
        if fmt is ExportFormat.alpaca_eval:
            prompts = {p["prompt_id"]: p["prompt"] for p in store.read_rows(store.catalog.resolve("prompts"))}
            path = exporters.write_alpaca_eval(
                output, exporters.alpaca_eval_records(rows, prompts, f"{label}:{model}")
            )
        else:
            path = exporters.write_arena_hard(output, exporters.arena_hard_records(rows, f"{label}-{mode}"))
        console.print(
            f"wrote {path} ({len({r['prompt_id'] for r in rows})} answers of {label}, {mode})", markup=False
        )
    except Exception as exc:
        fail(exc, debug)


def _eval_generation_sets(store: Any, label: str) -> list[Any]:
    """The latest eval_generations version holding ``label``'s answers."""
    for row in reversed(store.catalog.list_datasets()):
        if row["kind"] == "eval_generations":
            ref = store.catalog.resolve(row["name"])
            if any(r["model_label"] == label for r in store.read_rows(ref)):
                return [ref]
    raise ValueError(f"no eval_generations dataset holds answers of '{label}' in {store.workspace}")
