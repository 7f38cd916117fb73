"""`bvpo run` (the whole pipeline as one Prefect flow, then its report) and `bvpo config`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli.app import (
    ConfigOpt,
    DebugOpt,
    SetOpt,
    app,
    console,
    err,
    error_line,
    fail,
    pipeline_config,
    prepare_flow_process,
)
from pipeline.config import PipelineConfig


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
        cfg = pipeline_config(config, set_)
    except Exception as exc:
        fail(exc, debug)
        return
    prepare_flow_process()
    from flows.pipeline import bvpo_pipeline

    try:
        state = bvpo_pipeline(cfg, return_state=True)
        out = state.result()
        print_summary(out.summary)
    except Exception as exc:
        fail(exc, debug)
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
    from pipeline.reporting.run_report import default_report_dir, write_run_report
    from storage import DatasetStore
    from storage.runs import CatalogView

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
            cfg = pipeline_config(config, set_)
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
        fail(exc, debug)
        return
    err.print(f"wrote {output}", markup=False, highlight=False, soft_wrap=True)
