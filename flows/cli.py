"""The ``bvpo`` command line: run the pipeline, inspect datasets with SQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from enum import StrEnum
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


def _fail(exc: BaseException, debug: bool) -> None:
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


def _config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config, overrides or [])


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    report: Annotated[
        bool,
        typer.Option(help="Write the run report (Markdown + PNG) under <workspace>/reports/ at the end."),
    ] = True,
    debug: DebugOpt = False,
) -> None:
    """Run the whole pipeline (data refresh, BVPO training, evaluation) as one Prefect flow.

    Each stage shows its own progress bar (vLLM, scoring, reference log-probs, training) and logs through
    Prefect; a rerun reuses every dataset the catalog already holds for the same inputs.

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
        state = bvpo_pipeline(cfg, return_state=True)
        out = state.result()
        print_summary(out.summary)
    except Exception as exc:
        _fail(exc, debug)
        return
    if report:
        _report_after_run(cfg, out.eval_results.name, str(state.state_details.flow_run_id or ""))


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


def _report_after_run(cfg: PipelineConfig, eval_results: str, flow_run_id: str) -> None:
    """Write the report of the run that just finished; a failure here only warns (the run succeeded)."""
    from pipeline.reporting.run_report import CatalogView, default_report_dir, write_run_report
    from storage import DatasetStore

    try:
        store = DatasetStore(cfg.workspace)
        view = CatalogView(store)
        anchor = view.find(eval_results)
        if anchor is None:
            raise ValueError(f"{eval_results} is not in the catalog")
        name = _flow_run_name(flow_run_id)
        title = f"{name} ({flow_run_id})" if name else flow_run_id or None
        written = write_run_report(store, anchor, default_report_dir(store, anchor), title=title, view=view)
    except Exception as exc:  # the run itself succeeded: say why there is no report, do not fail
        err.print(f"warning: no run report: {error_line(exc)}", markup=False, highlight=False, soft_wrap=True)
        return
    console.print(f"Report:     {written.markdown}", markup=False, highlight=False)
    console.print(
        f"  rebuild:  bvpo report {anchor.name} -w {cfg.workspace}"
        + (f"   (or by flow run: bvpo report {name or flow_run_id})" if flow_run_id else ""),
        markup=False,
        highlight=False,
    )


def _flow_run_name(flow_run_id: str) -> str | None:
    """The Prefect name of a flow run (e.g. 'crimson-lemur'), or None when the API cannot say."""
    if not flow_run_id:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.read_flow_run(flow_run_id).name)
    except Exception:
        return None


@app.command("config")
def config_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Print the configuration reference (Markdown) instead.")
    ] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to FILE instead.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Print the effective configuration as YAML (defaults, then --config FILE, then --set overrides).

    The output is itself a valid config file. With --reference, print the reference of every key (type,
    default, bounds, description) generated from pipeline/config.py; docs/configuration.md is that output.

    Examples:
      bvpo config
      bvpo config --config configs/tiny.yaml --set train.alpha=1.0
      bvpo config --config configs/gpu-qwen3-8b.yaml > my-run.yaml
      bvpo config --reference --output docs/configuration.md
    """
    import yaml

    try:
        if reference:
            from pipeline.reporting.config_reference import config_reference_markdown

            text = config_reference_markdown()
        else:
            cfg = _config(config, set_)
            sources = ["defaults", *([str(config)] if config else []), *(f"--set {s}" for s in set_ or [])]
            text = f"# effective bvpo configuration: {' < '.join(sources)}\n" + yaml.safe_dump(
                cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100
            )
        if output is None:
            sys.stdout.write(text)
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except Exception as exc:
        _fail(exc, debug)
        return
    err.print(f"wrote {output}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def report(
    run: Annotated[
        str,
        typer.Argument(
            help="A Prefect flow run id (or its first 8+ characters) or name, a dataset of the run "
            "(eval_results__v3, train_metrics__v2), or 'latest'."
        ),
    ] = "latest",
    workspace: WorkspaceOpt = Path("workspace"),
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for report.md and the PNGs (default: <workspace>/reports/run-<dataset>).",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Write one run's report: report.md and PNGs (data, pairs per mode, training curves, α, eval with CIs).

    The run is found in the catalog: every dataset records the flow run that registered it, and the
    lineage of the run's evaluation gives every other dataset (reused ones too). A flow run name, or the
    id of a parent run such as bvpo_pipeline (whose subflows registered the datasets), is looked up in
    Prefect (PREFECT_API_URL, or the local Prefect database).

    Examples:
      bvpo report
      bvpo report 7d2644ac
      bvpo report crimson-lemur --workspace workspace
      bvpo report eval_results__v2 --output reports/alpha-0.5
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    from pipeline.reporting.run_report import (
        REPORT_STEPS,
        CatalogView,
        RunNotFound,
        default_report_dir,
        resolve_run,
        write_run_report,
    )
    from storage import DatasetStore

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), console=err, transient=True
    )
    try:
        store = DatasetStore(workspace)
        if not store.catalog.path.exists():
            raise FileNotFoundError(f"no catalog at {store.catalog.path}: run `bvpo run` first")
        view = CatalogView(store)
        title = None
        try:
            anchor = resolve_run(view, run)
        except RunNotFound as not_in_catalog:
            anchor, title = _anchor_through_prefect(view, run, not_in_catalog)
        with progress:
            task = progress.add_task("report", total=len(REPORT_STEPS))

            def on_step(description: str) -> None:
                done = REPORT_STEPS.index(description) if description in REPORT_STEPS else 0
                progress.update(task, description=description, completed=done)

            written = write_run_report(
                store,
                anchor,
                output or default_report_dir(store, anchor),
                title=title or (run if run not in ("latest", anchor.name) else None),
                view=view,
                on_step=on_step,
            )
    except Exception as exc:
        _fail(exc, debug)
        return
    console.print(f"wrote {written.markdown}", markup=False, highlight=False)
    for figure in written.figures:
        console.print(f"      {figure}", markup=False, highlight=False)


def _anchor_through_prefect(view: Any, run: str, not_in_catalog: Exception) -> tuple[Any, str]:
    """Ask Prefect for the flow run ``run`` (id or name) and its subflow runs, then find their datasets."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.runs import checkpoint_datasets, flow_run_family

    err.print(f"'{run}' is not a flow run id in the catalog; asking Prefect for it", markup=False)
    try:
        name, ids = flow_run_family(run)
    except LookupError as exc:
        raise LookupError(f"{not_in_catalog}; Prefect: {error_line(exc)}") from exc
    anchor = view.anchor_of_runs(ids)
    if anchor is None:  # every dataset was reused: the train run's artifact still names its checkpoint
        for qualified in checkpoint_datasets(ids):
            entry = view.get(qualified)
            if entry is not None:
                anchor = view.downstream(entry)
                break
    if anchor is None:
        where = view.store.catalog.path
        raise LookupError(f"flow run '{name}' ({ids[0]}) and its subflows registered no dataset in {where}")
    return anchor, f"{name} ({ids[0]})"


DEFAULT_SERVER_HOST = "127.0.0.1"
DEFAULT_SERVER_PORT = 4200


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = (
        DEFAULT_SERVER_HOST
    ),
    port: Annotated[
        int, typer.Option(help="Port of the API and the UI.", min=1, max=65535)
    ] = DEFAULT_SERVER_PORT,
    debug: DebugOpt = False,
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
    try:
        os.execv(sys.executable, command)
    except OSError as exc:
        _fail(exc, debug)


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
                # Prefect read its settings when it was imported (validating the options did that):
                # reread them, or the client would start a temporary server of its own instead.
                from prefect.context import refresh_global_settings_context

                refresh_global_settings_context()
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


class ExportFormat(StrEnum):
    alpaca_eval = "alpaca-eval"
    arena_hard = "arena-hard"


@app.command()
def export(
    fmt: Annotated[ExportFormat, typer.Argument(help="alpaca-eval (JSON list) or arena-hard (JSONL).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    label: Annotated[str, typer.Option(help="Model label in eval_generations (reference, trained, …).")] = (
        "trained"
    ),
    mode: Annotated[str, typer.Option(help="Reasoning mode: trace (on) or empty (off).")] = "trace",
    dataset: Annotated[str, typer.Option(help="The eval_generations dataset holding the answers.")] = "",
    workspace: WorkspaceOpt = Path("workspace"),
    debug: DebugOpt = False,
) -> None:
    """Export a model's eval answers for AlpacaEval or Arena-Hard (final answers only, first sample).

    Examples:
      bvpo export alpaca-eval -o out/trained.json
      bvpo export arena-hard --label reference --mode empty -o out/reference.jsonl
    """
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
        _fail(exc, debug)


def _eval_generation_sets(store: Any, label: str) -> list[Any]:
    """The latest eval_generations version holding ``label``'s answers."""
    for row in reversed(store.catalog.list_datasets()):
        if row["kind"] == "eval_generations":
            ref = store.catalog.resolve(row["name"])
            if any(r["model_label"] == label for r in store.read_rows(ref)):
                return [ref]
    raise ValueError(f"no eval_generations dataset holds answers of '{label}' in {store.workspace}")


@app.command("lm-eval")
def lm_eval(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory (or hub id) to evaluate.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Harness output directory.")] = Path(
        "workspace/reports/lm-eval"
    ),
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval tasks.")] = "gsm8k,minerva_math500",
    limit: Annotated[int | None, typer.Option(help="Examples per task (default: all).")] = None,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs per model (vLLM).")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command only.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run math benchmarks (GSM8K, MATH-500, …) on a checkpoint with lm-eval's vLLM backend (GPU).

    Needs `pip install 'lm-eval\\[vllm]'` and hub access for the task datasets.

    Examples:
      bvpo lm-eval workspace/checkpoints/<version> --dry-run
      bvpo lm-eval workspace/checkpoints/<version> --tasks gsm8k --limit 200
    """
    import shlex

    from pipeline.evaluation.harness import LmEvalRun, run_lm_eval
    from pipeline.evaluation.report import comparison_markdown

    run_spec = LmEvalRun(
        checkpoint, output, tuple(t for t in tasks.split(",") if t), limit=limit,
        tensor_parallel_size=tensor_parallel_size,
    )  # fmt: skip
    if dry_run:
        print(shlex.join(run_spec.command()))
        return
    try:
        rows = run_lm_eval(run_spec)
    except Exception as exc:
        _fail(exc, debug)
        return
    console.print(comparison_markdown(rows), markup=False, highlight=False)


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


@app.command("analyze-variance")
def analyze_variance(
    workspace: WorkspaceOpt = Path("workspace"),
    model: Annotated[
        str | None,
        typer.Option(help="Model to probe: 'embedded', a checkpoint folder or a hub id (default: model.*)."),
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Reference model π_ref (default: --model itself, as at step 0).")
    ] = None,
    pairs: Annotated[
        str, typer.Option(help="The D_t pairs: kind (latest), kind__v<N>, kind:<version> or a version id.")
    ] = "pairs_trace",
    generations: Annotated[
        str | None,
        typer.Option(help="Dataset of the stored traces (default: the generations the pairs came from)."),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="α of g_c = α g_t + (1−α) g_e (default: train.alpha, or α̂*)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the grad_stats row as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Measure α̂* and the trace-induced gradient variance of a model on stored pairs, without training.

    Runs the gradient probe once (train.probe.* sets its size): per-example gradients of ℓ_t over stored
    reasoning-on traces, of ℓ_e, and the marginal-gradient estimate Ĝ, then prints α̂* with its bootstrap
    interval, the trace-induced variances tr Var_r(g_t) and tr Var_r(g_c), E‖g_t − g_e‖²,
    E⟨g_e − Ĝ, g_e − g_t⟩ and the biases.

    Examples:
      bvpo analyze-variance
      bvpo analyze-variance -w workspace --pairs pairs_trace__v2 --alpha 0.5
      bvpo analyze-variance --model workspace/checkpoints/<version> --reference embedded
      bvpo analyze-variance --set train.probe.prompts=16 --set train.probe.traces=8 --json
    """
    import json

    try:
        from pipeline.config import ModelConfig
        from pipeline.training.grad_probe import analyze_variance as probe_once
        from pipeline.training.grad_probe import variance_table
        from storage import DatasetStore
        from tasks.stages import generations_for, resolve_model_path

        cfg = _config(config, set_)
        store = DatasetStore(workspace)
        pairs_ref = store.catalog.resolve(pairs)
        if pairs_ref.kind != "pairs_trace":
            raise ValueError(f"'{pairs}' is a {pairs_ref.kind} dataset, not pairs_trace")
        gens_ref = store.catalog.resolve(generations) if generations else generations_for(store, pairs_ref)
        model_cfg = cfg.model if model is None else ModelConfig(name_or_path=model)
        ref_path = None if reference is None else resolve_model_path(ModelConfig(name_or_path=reference))
        err.print(f"probing {model_cfg.name_or_path} on {pairs_ref.name} with traces of {gens_ref.name}")
        row = probe_once(
            resolve_model_path(model_cfg),
            store.read_rows(pairs_ref),
            store.read_rows(gens_ref),
            cfg.train,
            reference_path=ref_path,
            alpha=alpha,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except Exception as exc:
        _fail(exc, debug)
        return
    if as_json:
        print(json.dumps(row))
        return
    _print_rows(["quantity", "value", "meaning"], variance_table(row))


if __name__ == "__main__":
    app()
