"""One report per pipeline run: Markdown and PNG figures (`bvpo report`, and the end of `bvpo run`).

Which datasets belong to the run is decided in :mod:`storage.runs` (from the catalog alone); this module
reads their aggregates (:mod:`pipeline.reporting.run_stats`), draws the figures with
:func:`pipeline.training.plots.plot_training_curves`, :mod:`pipeline.evaluation.report` and
:mod:`pipeline.training.grad_plots`, and writes the Markdown of :mod:`pipeline.reporting.run_markdown`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.reporting.run_markdown import run_markdown
from pipeline.reporting.run_stats import RunStats
from pipeline.reporting.stage_timing import report_section
from storage import DatasetStore
from storage.runs import CatalogView, Entry, collect_run

REPORT_NAME = "report.md"
REPORT_STEPS = (
    "reading the datasets",
    "plotting the training curves",
    "plotting the evaluation",
    "writing the Markdown",
)
"""What :func:`write_run_report` reports through ``on_step``, in order."""


@dataclass
class RunReport:
    """What :func:`write_run_report` wrote."""

    markdown: Path
    figures: list[Path]
    anchor: str
    datasets: list[str] = field(default_factory=list)


def write_run_report(
    store: DatasetStore,
    anchor: Entry,
    out_dir: Path,
    *,
    title: str | None = None,
    view: CatalogView | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunReport:
    """Write ``report.md`` and its PNG figures for the run ``anchor`` belongs to into ``out_dir``."""
    step = on_step or (lambda _: None)
    view = view or CatalogView(store)
    run = collect_run(view, anchor)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    step("reading the datasets")
    stats = RunStats(store, run)
    metrics = stats.rows(run.one("train_metrics"))
    evals = stats.rows(run.one("eval_results"))
    step("plotting the training curves")
    curves = None
    if metrics:
        from pipeline.training.plots import plot_training_curves

        curves = plot_training_curves(metrics, out_dir / "training-curves.png")
        figures.append(curves)
    step("plotting the evaluation")
    chart = None
    if any(r["metric"] == "score" for r in evals):
        from pipeline.evaluation.report import comparison_chart

        chart = comparison_chart(evals, out_dir / "eval-scores.png")
        figures.append(chart)
    probe_rows = stats.rows(run.grad_stats)
    probe = None
    if probe_rows:
        from pipeline.training.grad_plots import plot_grad_stats

        probe = plot_grad_stats(probe_rows, out_dir / "grad-probe.png", metrics=metrics)
        figures.append(probe)
    if len(figures) > 1:
        figures.append(_stack_pngs(figures, out_dir / "report.png"))
    step("writing the Markdown")
    text = run_markdown(store, run, stats, metrics, evals, curves, chart, title, (probe_rows, probe))
    timing = report_section(store.workspace, sorted({e.flow_run_id for e in run.lineage if e.flow_run_id}))
    if timing:  # "Where the time went" (pipeline/reporting/stage_timing.py)
        text = text.rstrip("\n") + "\n" + "\n".join(timing) + "\n"
    markdown = out_dir / REPORT_NAME
    markdown.write_text(text, encoding="utf-8")
    return RunReport(markdown, figures, anchor.name, [e.name for e in run.lineage])


def default_report_dir(store: DatasetStore, anchor: Entry) -> Path:
    """``<workspace>/reports/run-<anchor dataset>/``."""
    return store.workspace / "reports" / f"run-{anchor.name}"


def _stack_pngs(paths: Sequence[Path], out: Path) -> Path:
    """One PNG of several, stacked vertically on a white background (for pasting into a PR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import numpy as np

    images = [mpimg.imread(str(p)) for p in paths]
    images = [np.dstack([i, np.ones(i.shape[:2])]) if i.shape[2] == 3 else i for i in images]
    width = max(i.shape[1] for i in images)
    padded = []
    for image in images:
        pad = width - image.shape[1]
        padded.append(np.pad(image, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)), constant_values=1.0))
    mpimg.imsave(str(out), np.vstack(padded))
    return out
