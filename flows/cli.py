"""The ``bvpo`` command line: run the pipeline, inspect datasets with SQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
        scores = ", ".join(f"{label} {value:.3f}" for label, value in values.items())
        console.print(f"Eval score ({mode}): {scores}")
    console.print(f"Checkpoint: {summary['checkpoint']}")
    console.print(f"Catalog:    {summary['paths']['catalog']}")
    workspace = summary["paths"]["workspace"]
    console.print("\nInspect the datasets:")
    for kind in summary["datasets"]:
        console.print(f'  bvpo sql -w {workspace} "select * from {kind} limit 5"')


DEFAULT_SERVER_HOST = "127.0.0.1"
DEFAULT_SERVER_PORT = 4200


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = (
        DEFAULT_SERVER_HOST
    ),
    port: Annotated[int, typer.Option(help="Port of the API and the UI.")] = DEFAULT_SERVER_PORT,
) -> None:
    """Start a local Prefect server (API and UI): `prefect server start` with this project's defaults.

    Its database lives under PREFECT_HOME (~/.prefect). Set PREFECT_SERVER_API_AUTH_STRING=user:password
    to require basic auth (clients then set PREFECT_API_AUTH_STRING to the same value).

    Example:
      bvpo server                   # UI at http://127.0.0.1:4200
    """
    os.environ.update(_server_env(host, port))
    console.print(f"Prefect UI: http://{host}:{port}   API: http://{host}:{port}/api")
    console.print(f"Point clients at it: export PREFECT_API_URL=http://{host}:{port}/api")
    sys.stdout.flush()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    os.execv(sys.executable, command)


def _server_env(host: str, port: int) -> dict[str, str]:
    """Environment of `prefect server start`: the UI must call the API on this port, not the default 4200."""
    browser_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", f"http://{browser_host}:{port}/api"),
    }


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[
        str, typer.Option(help="Cron schedule of the data_refresh deployment; 'none' for no schedule.")
    ] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule (IANA name).")] = "UTC",
    gpu_slots: Annotated[
        int, typer.Option(help="Tasks tagged 'gpu' that may run at once over all flows (0: no limit).")
    ] = 1,
    reset_gpu_slots: Annotated[
        bool,
        typer.Option(
            help="Free every 'gpu' slot first (after a crash killed runs holding them; their leases would "
            "otherwise lapse in about a minute). Only when no other flow is running GPU tasks."
        ),
    ] = False,
    eval_after_train: Annotated[
        bool, typer.Option(help="Start an evaluate run when a train_bvpo deployment run completes.")
    ] = True,
    heartbeat: Annotated[
        int,
        typer.Option(
            help="Seconds (>= 30) between flow-run heartbeats; silent runs become Crashed (0: off)."
        ),
    ] = 30,
    limit: Annotated[int | None, typer.Option(help="Flow runs executed at once (default: no limit).")] = None,
    port: Annotated[
        int, typer.Option(help="Port of the local Prefect server started when PREFECT_API_URL is unset.")
    ] = DEFAULT_SERVER_PORT,
    debug: DebugOpt = False,
) -> None:
    """Register and serve the deployments data-refresh, train-bvpo, evaluate and bvpo-pipeline.

    Runs triggered from the Prefect UI (or its schedule, or the eval-after-train trigger) execute in this
    process. Without PREFECT_API_URL a local Prefect server is started first (UI on 127.0.0.1:PORT).
    The config given here is the default parameter of every deployment's form.

    Examples:
      bvpo serve --config configs/default.yaml
      PREFECT_API_URL=http://127.0.0.1:4200/api bvpo serve --cron "0 */6 * * *" --gpu-slots 2
    """
    try:
        cfg = _config(config, set_)
        options = _serve_options(cron, timezone, gpu_slots, eval_after_train, heartbeat, limit)
        options.reset_gpu_slots = reset_gpu_slots
    except Exception as exc:
        _fail(exc, debug)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    local = None
    try:
        if not os.environ.get("PREFECT_API_URL"):
            local = _start_local_server(DEFAULT_SERVER_HOST, port)
        from flows.deployments import serve_deployments

        serve_deployments(cfg, options)
    except Exception as exc:
        _fail(exc, debug)
    finally:
        if local is not None:
            local.terminate()
            local.wait(timeout=30)


@app.command()
def deploy(
    work_pool: Annotated[
        str, typer.Option("--work-pool", "-p", help="Work pool whose workers run the flows.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str, typer.Option(help="Cron schedule of data_refresh; 'none' for none.")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    gpu_slots: Annotated[
        int, typer.Option(help="Tasks tagged 'gpu' at once over all flows (0: no limit).")
    ] = 1,
    eval_after_train: Annotated[bool, typer.Option(help="Evaluate after each train_bvpo run.")] = True,
    job_variable: Annotated[
        list[str] | None, typer.Option("--job-variable", "-j", help="KEY=VALUE job variable (YAML value).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Register the four deployments on a work pool, for workers on a cluster (needs PREFECT_API_URL).

    Start workers where the GPUs are, e.g. `prefect worker start --pool gpu --type process`, from an
    environment with this project installed.

    Example:
      bvpo deploy --work-pool gpu --config configs/default.yaml
    """
    import yaml

    try:
        if not os.environ.get("PREFECT_API_URL"):
            raise ValueError("set PREFECT_API_URL to the Prefect server the workers poll")
        cfg = _config(config, set_)
        options = _serve_options(cron, timezone, gpu_slots, eval_after_train, 30, None)
        variables: dict[str, Any] = {}
        for item in job_variable or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"job variable '{item}' must look like KEY=VALUE")
            variables[key] = yaml.safe_load(raw)
        from flows.deployments import deploy_to_work_pool

        ids = deploy_to_work_pool(cfg, options, work_pool, variables or None)
    except Exception as exc:
        _fail(exc, debug)
        return
    console.print(f"Registered {len(ids)} deployments on work pool '{work_pool}'.")


def _serve_options(
    cron: str, timezone: str, gpu_slots: int, eval_after_train: bool, heartbeat: int, limit: int | None
) -> Any:
    from flows.deployments import ServeOptions

    return ServeOptions(
        refresh_cron=cron,
        timezone=timezone,
        gpu_slots=gpu_slots,
        eval_after_train=eval_after_train,
        heartbeat_seconds=heartbeat or None,
        limit=limit,
    )


def _start_local_server(host: str, port: int, timeout_s: float = 120.0) -> subprocess.Popen[bytes]:
    """Start `prefect server start` in the background and point this process at it."""
    import httpx

    url = f"http://{host}:{port}/api"
    env = {**os.environ, **_server_env(host, port)}
    err.print(f"PREFECT_API_URL is not set: starting a local Prefect server at {url}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env=env
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the Prefect server exited with code {proc.returncode} (is port {port} free?)"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                os.environ["PREFECT_API_URL"] = url
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the Prefect server did not answer at {url} within {timeout_s:.0f} s")


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
        Path | None, typer.Option("--output", "-o", help="Also write OUTPUT.md and OUTPUT.png.")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Compare evaluations: every model and mode with 95% intervals, as a Markdown table (and a PNG).

    Examples:
      bvpo compare
      bvpo compare eval_results__v1 eval_results__v2 --output reports/v1-vs-v2
    """
    from pipeline.evaluation.report import comparison_markdown, merge_runs, write_comparison_report
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
            console.print(f"wrote {markdown} and {chart}", markup=False)
    except Exception as exc:
        _fail(exc, debug)


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
