"""Analysis commands: `bvpo report` (one run's report), `bvpo analyze-variance`, `bvpo lm-eval`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.app import (
    ConfigOpt,
    DebugOpt,
    SetOpt,
    WorkspaceOpt,
    app,
    console,
    err,
    error_line,
    fail,
    pipeline_config,
    print_rows,
)


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

    from pipeline.reporting.run_report import REPORT_STEPS, default_report_dir, write_run_report
    from storage import DatasetStore
    from storage.runs import CatalogView, RunNotFound, resolve_run

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
        fail(exc, debug)
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
        fail(exc, debug)
        return
    console.print(comparison_markdown(rows), markup=False, highlight=False)


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
        typer.Option(min=0.0, max=1.0, help="α at which MSE(α) is reported (default: train.alpha, or α̂*)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the grad_stats row as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Measure α̂* and the trace-induced gradient variance of a model on stored pairs, without training.

    Runs the gradient probe once (train.probe.* sets its size): per-example gradients of ℓ_t with each
    answer after stored reasoning-on traces weighted to the sampler's posterior (as the trainer sees them),
    of ℓ_e, and the marginal-gradient estimate Ĝ, then prints α̂* with its bootstrap interval, the measured
    trace-induced variance tr Var_r(g_t), E‖g_t − g_e‖², E⟨g_e − Ĝ, g_e − g_t⟩, the biases, MSE(α) and the
    smallest effective sample size of the importance weights.

    Examples:
      bvpo analyze-variance
      bvpo analyze-variance -w workspace --pairs pairs_trace__v2 --alpha 0.5
      bvpo analyze-variance --model workspace/checkpoints/<version> --reference embedded
      bvpo analyze-variance --set train.probe.prompts=16 --set train.probe.traces=8 --json
    """
    import json

    try:
        from pipeline.config import ModelConfig
        from pipeline.models import resolve_model_path
        from pipeline.training.grad_probe import analyze_variance as probe_once
        from pipeline.training.grad_probe import variance_table
        from storage import DatasetStore
        from storage.lineage import generations_for

        cfg = pipeline_config(config, set_)
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
        fail(exc, debug)
        return
    if as_json:
        print(json.dumps(row))
        return
    print_rows(["quantity", "value", "meaning"], variance_table(row))
