"""Comparison report of ``eval_results``: a Markdown table and a PNG bar chart with 95% intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_METRICS = (
    "score",
    "win_rate_vs_reference",
    "lc_win_rate_vs_reference",
    "score_diff_vs_reference",
    "answer_tokens",
    "trace_tokens",
)


PROSE_METRICS = frozenset({"mde_vs_reference"})  # stated in a sentence (power_lines), not a column


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per (model, mode); one column per metric, as ``value [low, high]``."""
    present = {r["metric"] for r in rows} - PROSE_METRICS
    metrics = [m for m in REPORT_METRICS if m in present] + sorted(present - set(REPORT_METRICS))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r["metric"] in metrics:
            cells.setdefault((r["model_label"], r["mode"]), {})[r["metric"]] = _cell(r)
    lines = ["| model | mode | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (label, mode), values in sorted(cells.items()):
        lines.append(f"| {label} | {mode} | " + " | ".join(values.get(m, "-") for m in metrics) + " |")
    return "\n".join(lines)


def power_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences stating the minimum detectable difference of the eval set (``docs/method.md`` §Statistics).

    Per mode: the prompts, and the smallest and largest MDE over the models compared with the reference
    (``mde_vs_reference`` rows of :func:`pipeline.evaluation.metrics.summarize`).
    """
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["metric"] == "mde_vs_reference":
            by_mode.setdefault(r["mode"], []).append(r)
    if not by_mode:
        return []
    parts = []
    for mode, found in sorted(by_mode.items()):
        values = sorted(float(r["value"]) for r in found)
        n = max(int(r["n"]) for r in found)
        span = f"{values[0]:.3f}" if values[0] == values[-1] else f"{values[0]:.3f}–{values[-1]:.3f}"
        parts.append(f"{mode}: {span} on {n} prompts")
    return [
        "**Minimum detectable difference** (score vs the reference, 95% level, 80% power, from the SD of "
        "the per-prompt differences): " + "; ".join(parts) + ". A true difference smaller than this "
        "would usually go unseen, so an interval that includes 0 does not show the models are equal."
    ]


def _cell(row: dict[str, Any]) -> str:
    low, high = row.get("ci_low"), row.get("ci_high")
    if low is None or high is None:
        return f"{row['value']:.3f}"
    return f"{row['value']:.3f} [{low:.3f}, {high:.3f}]"


def comparison_chart(rows: Sequence[dict[str, Any]], path: Path, metric: str = "score") -> Path:
    """Grouped bars of ``metric`` per model, one group per mode, with 95% interval error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r["metric"] == metric]
    modes = sorted({r["mode"] for r in selected})
    labels = sorted({r["model_label"] for r in selected})
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, label in enumerate(labels):
        values, errors = [], [[], []]
        for mode in modes:
            row = next((r for r in selected if r["model_label"] == label and r["mode"] == mode), None)
            value = row["value"] if row else float("nan")
            values.append(value)
            errors[0].append(value - row["ci_low"] if row and row["ci_low"] is not None else 0.0)
            errors[1].append(row["ci_high"] - value if row and row["ci_high"] is not None else 0.0)
        positions = [m + i * width for m in range(len(modes))]
        ax.bar(positions, values, width, yerr=errors, capsize=4, label=label)
    ax.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(modes))], modes)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by model and reasoning mode (95% bootstrap intervals)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_comparison_report(
    rows: Sequence[dict[str, Any]], stem: Path, title: str = "Evaluation"
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (table, model list, chart link) and ``<stem>.png``; return both paths."""
    chart = comparison_chart(rows, stem.with_suffix(".png"))
    models = sorted({(r["model_label"], r["model"]) for r in rows})
    lines = [
        f"# {title}",
        "",
        "Each cell: value [95% percentile-bootstrap interval over prompts]. Win rates are against the "
        "reference model (ties count one half; length-controlled rates regress out the answer-length "
        "difference).",
        "",
        comparison_markdown(rows),
        "",
        *[line for sentence in power_lines(rows) for line in (sentence, "")],
        "| label | model |",
        "|---|---|",
        *[f"| {label} | `{model}` |" for label, model in models],
        "",
        f"![score by model and mode]({chart.name})",
        "",
    ]
    markdown = stem.with_suffix(".md")
    markdown.write_text("\n".join(lines))
    return markdown, chart


def merge_runs(runs: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One ``eval_results`` table from several runs, each model labelled ``<run>/<label>``.

    Args:
        runs: run name → its ``eval_results`` rows (insertion order is kept in the report).

    Returns:
        The rows of every run; with a single run the labels are left as they are.
    """
    if len(runs) == 1:
        return [dict(row) for row in next(iter(runs.values()))]
    return [
        {**row, "model_label": f"{run}/{row['model_label']}"} for run, rows in runs.items() for row in rows
    ]
