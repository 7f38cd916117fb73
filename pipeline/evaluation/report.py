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
    """One row per (model, mode); one column per metric, as ``value [low, high]``.

    When the models span more than one training round (:func:`rounds_compared`) a ``round`` column
    follows the model's.
    """
    present = {r["metric"] for r in rows} - PROSE_METRICS
    metrics = [m for m in REPORT_METRICS if m in present] + sorted(present - set(REPORT_METRICS))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    rounds: dict[str, str] = {}
    for r in rows:
        if r["metric"] in metrics:
            cells.setdefault((r["model_label"], r["mode"]), {})[r["metric"]] = _cell(r)
            rounds[r["model_label"]] = "-" if r.get("round") is None else str(r["round"])
    keys = ["model", *(["round"] if len(rounds_compared(rows)) > 1 else []), "mode"]
    lines = ["| " + " | ".join([*keys, *metrics]) + " |", "|" + "---|" * (len(keys) + len(metrics))]
    for (label, mode), values in sorted(cells.items()):
        lead = {"model": label, "round": rounds[label], "mode": mode}
        lines.append(
            "| " + " | ".join([*(lead[k] for k in keys), *(values.get(m, "-") for m in metrics)]) + " |"
        )
    return "\n".join(lines)


def rounds_compared(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The training rounds of the trained models among ``rows`` (the base model's round 0 and unknown
    rounds left out), sorted."""
    return sorted({int(r["round"]) for r in rows if r.get("round")})


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
            down, up = _errors(row) if row else (0.0, 0.0)
            errors[0].append(down)
            errors[1].append(up)
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


def rounds_chart(rows: Sequence[dict[str, Any]], path: Path, metric: str = "score") -> Path:
    """``metric`` against the training round, one panel per mode, one series per model label (without
    the ``<run>/`` prefix of :func:`merge_runs`), with the rows' 95% intervals as error bars.

    Round 0 is the base model (the reference of each evaluation); rows of unknown round are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = sorted(
        (r for r in rows if r["metric"] == metric and r.get("round") is not None), key=lambda r: r["round"]
    )
    modes = sorted({r["mode"] for r in selected}) or [""]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in selected:
            if r["mode"] == mode:
                series.setdefault(r["model_label"].rsplit("/", 1)[-1], []).append(r)
        for label, points in sorted(series.items()):
            xs = [int(r["round"]) for r in points]
            errors = list(zip(*(_errors(r) for r in points), strict=True))
            style = "o-" if len(set(xs)) == len(xs) else "o"  # a line only through distinct rounds
            ax.errorbar(xs, [r["value"] for r in points], yerr=errors, fmt=style, capsize=4, label=label)
        ax.set_xticks(sorted({int(r["round"]) for r in selected}))
        ax.set_xlabel("training round (0: the base model)")
        ax.set_title(f"mode {mode}")
        ax.legend()
    axes[0][0].set_ylabel(f"{metric} (95% bootstrap interval)")
    fig.suptitle(f"{metric} per training round")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _errors(row: dict[str, Any]) -> tuple[float, float]:
    """Distances from a row's value down to ``ci_low`` and up to ``ci_high`` (0 where there is none)."""
    value, low, high = float(row["value"]), row.get("ci_low"), row.get("ci_high")
    return (0.0 if low is None else value - low, 0.0 if high is None else high - value)


def rounds_chart_path(stem: Path) -> Path:
    """Where :func:`write_comparison_report` puts the score-per-round chart of ``stem``."""
    return stem.with_name(f"{stem.name}-rounds.png")


def write_comparison_report(
    rows: Sequence[dict[str, Any]], stem: Path, title: str = "Evaluation"
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (table, model list, chart link) and ``<stem>.png``; return both paths.

    When the models span more than one training round, also ``<stem>-rounds.png`` (:func:`rounds_chart`),
    linked from the Markdown.
    """
    chart = comparison_chart(rows, stem.with_suffix(".png"))
    by_round = rounds_chart(rows, rounds_chart_path(stem)) if len(rounds_compared(rows)) > 1 else None
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
        *([f"![score per training round]({by_round.name})", ""] if by_round else []),
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
