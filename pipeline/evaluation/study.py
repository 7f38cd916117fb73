"""The α study's numbers and report (``docs/method.md`` §Statistics): held-out score against α, both
modes, with paired intervals against the reference and against the better of the two baselines.

Arms are (α, seed) pairs trained on the same data; every arm is evaluated on the same prompts. Per α the
seeds are pooled (a prompt's score is its mean over seeds and samples); the seed-to-seed spread is
reported next to it, since the bootstrap over prompts does not see training noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.metrics import bootstrap_ci
from pipeline.evaluation.paired import (
    best_baseline,
    paired_bootstrap,
    per_prompt_scores,
    seed_spread,
)

REFERENCE = "reference"
BASELINES = ("0", "1")  # α = 0 (DPO on empty traces) and α = 1 (DPO on traces)
MODES = ("trace", "empty")
_OPTIONAL = (
    "alpha_final", "diff_ref", "diff_ref_low", "diff_ref_high", "best_baseline", "diff_best",
    "diff_best_low", "diff_best_high", "mde_ref", "seed_sd", "pairs_per_step", "tokens_per_step",
)  # fmt: skip


def alpha_key(alpha: float | str) -> str:
    """A grid value as text: ``0``, ``0.25``, ``1``, ``auto`` (names of the baselines resolved)."""
    if isinstance(alpha, str):
        named = {"dpo_trace": "1", "dpo_empty": "0"}
        if alpha in named or alpha == "auto":
            return named.get(alpha, alpha)
        alpha = float(alpha)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"α must be in [0, 1] or 'auto', got {alpha}")
    return f"{float(alpha):g}"


@dataclass(frozen=True)
class Arm:
    """One trained model of the study."""

    alpha: str  # :func:`alpha_key`
    seed: int

    @property
    def label(self) -> str:
        return f"alpha={self.alpha}/seed={self.seed}"


def arms_of(alphas: Sequence[float | str], seeds: Sequence[int]) -> list[Arm]:
    """The grid α × seeds, α in the given order, without duplicates."""
    keys = list(dict.fromkeys(alpha_key(a) for a in alphas))
    if not keys or not seeds:
        raise ValueError("a study needs at least one α and one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    return [Arm(a, int(s)) for a in keys for s in seeds]


def study_rows(
    eval_rows: Sequence[Mapping[str, Any]],
    arms: Sequence[Arm],
    train_metrics: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    samples: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of the ``study_results`` schema: the reference and one row per α and mode.

    Args:
        eval_rows: scored ``eval_generations`` rows of the reference and every arm (by ``model_label``).
        arms: the study's arms.
        train_metrics: ``train_metrics`` rows per arm label (α trained, pairs and tokens per step).
        samples, seed: bootstrap resamples and their seed.
    """
    by_label: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in eval_rows:
        by_label.setdefault((str(row["model_label"]), str(row["mode"])), []).append(row)
    alphas = list(dict.fromkeys(a.alpha for a in arms))
    out: list[dict[str, Any]] = []
    for mode in MODES:
        reference = per_prompt_scores(by_label.get((REFERENCE, mode), []))
        if not reference:
            raise ValueError(f"no reference answers in mode {mode}")
        out.append(_score_row(REFERENCE, mode, reference, samples, seed) | {"seeds": 0})
        pooled: dict[str, dict[str, float]] = {}
        per_seed: dict[str, dict[int, dict[str, float]]] = {}
        for alpha in alphas:
            mine = [a for a in arms if a.alpha == alpha]
            per_seed[alpha] = {a.seed: per_prompt_scores(by_label.get((a.label, mode), [])) for a in mine}
            pooled[alpha] = per_prompt_scores(r for a in mine for r in by_label.get((a.label, mode), []))
        best = best_baseline(pooled, BASELINES)
        for alpha in alphas:
            if not pooled[alpha]:
                raise ValueError(f"no answers of α={alpha} in mode {mode}")
            row = _score_row(alpha, mode, pooled[alpha], samples, seed)
            vs_ref = paired_bootstrap(pooled[alpha], reference, samples=samples, seed=seed)
            spread = seed_spread(per_seed[alpha])
            metrics = [m for a in arms if a.alpha == alpha for m in train_metrics.get(a.label, [])]
            finals = [
                float(list(train_metrics[a.label])[-1]["alpha"])
                for a in arms
                if a.alpha == alpha and train_metrics.get(a.label)
            ]
            row.update(
                seeds=len(per_seed[alpha]),
                alpha_final=float(np.mean(finals)) if finals else None,
                diff_ref=vs_ref.mean,
                diff_ref_low=vs_ref.ci_low,
                diff_ref_high=vs_ref.ci_high,
                mde_ref=vs_ref.mde,
                seed_sd=spread.sd,
                best_baseline=best,
                pairs_per_step=_mean([(m.get("pairs_t") or 0) + (m.get("pairs_e") or 0) for m in metrics]),
                tokens_per_step=_mean([m.get("tokens") for m in metrics]),
            )
            if best is not None and alpha != best:
                vs_best = paired_bootstrap(pooled[alpha], pooled[best], samples=samples, seed=seed)
                row.update(
                    diff_best=vs_best.mean, diff_best_low=vs_best.ci_low, diff_best_high=vs_best.ci_high
                )
            out.append(row)
    return out


def _score_row(alpha: str, mode: str, scores: Mapping[str, float], samples: int, seed: int) -> dict[str, Any]:
    values = list(scores.values())
    low, high = bootstrap_ci(values, samples, seed)
    return dict.fromkeys(_OPTIONAL) | {
        "alpha": alpha,
        "mode": mode,
        "n": len(values),
        "score": float(np.mean(values)),
        "score_low": low,
        "score_high": high,
    }


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _interval(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    mark = " *" if low is not None and high is not None and (low > 0 or high < 0) else ""
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def study_markdown(rows: Sequence[Mapping[str, Any]], chart: str | None = None) -> str:
    """The report: setup, one table per mode, the MDE, and how to read a non-significant difference."""
    lines = ["# α study", ""]
    arms = [r for r in rows if r["alpha"] != REFERENCE]
    n = max((int(r["n"]) for r in rows), default=0)
    seeds = max((int(r["seeds"] or 0) for r in arms), default=0)
    steps = sorted({round(r["pairs_per_step"]) for r in arms if r.get("pairs_per_step") is not None})
    lines += [
        f"{len({r['alpha'] for r in arms})} values of α × {seeds} seed(s), all trained on the same D_t/D_e "
        f"and reference log-probs; {n} held-out prompts per mode, the same for every model. "
        f"Pairs per optimizer step: {', '.join(str(s) for s in steps) or '-'} (one value: matched budgets).",
        "",
        "Score: mean per-prompt score, seeds pooled, with a 95% percentile-bootstrap interval over prompts. "
        "Δ: paired difference over prompts (seeds pooled) against the reference and against the better of "
        "α = 0 and α = 1 in that mode; * marks an interval that excludes 0. Seed SD: spread of the per-seed "
        "means (training noise, not in the intervals).",
        "",
    ]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        ref = next(r for r in mine if r["alpha"] == REFERENCE)
        best = next((r["best_baseline"] for r in mine if r.get("best_baseline")), None)
        lines += [
            f"## Reasoning {'on' if mode == 'trace' else 'off'} ({mode})",
            "",
            f"Reference: {ref['score']:.3f} [{ref['score_low']:.3f}, {ref['score_high']:.3f}]; "
            f"best baseline: α = {best if best is not None else '-'}.",
            "",
            "| α | α trained (final) | score | Δ vs reference | Δ vs best baseline | seed SD | MDE |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            if r["alpha"] == REFERENCE:
                continue
            final = "-" if r.get("alpha_final") is None else f"{r['alpha_final']:.3f}"
            lines.append(
                f"| {r['alpha']} | {final} | {r['score']:.3f} [{r['score_low']:.3f}, {r['score_high']:.3f}] "
                f"| {_interval(r, 'diff_ref')} | {_interval(r, 'diff_best')} | {r['seed_sd']:.3f} "
                f"| {r['mde_ref']:.3f} |"
            )
        lines.append("")
    mdes = [float(r["mde_ref"]) for r in arms if r.get("mde_ref") is not None and math.isfinite(r["mde_ref"])]
    if mdes:
        lines += [
            f"**Minimum detectable difference** (95% level, 80% power, from the SD of the paired "
            f"differences on {n} prompts): {min(mdes):.3f}–{max(mdes):.3f}. A true effect smaller than this "
            "would usually not be seen: an interval that includes 0 then says the study was too small, "
            "not that the models are equal.",
            "",
        ]
    if chart:
        lines += [f"![held-out score against α]({chart})", ""]
    return "\n".join(lines)


def study_chart(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Score against α per mode with 95% intervals; the reference as a dashed line; α̂* (the ``auto``
    arm's final α, mean over seeds) as a dotted vertical line and its score as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"trace": "tab:blue", "empty": "tab:orange"}
    alpha_star: list[float] = []
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        fixed = sorted((float(r["alpha"]), r) for r in mine if r["alpha"] not in (REFERENCE, "auto"))
        if fixed:
            xs = [x for x, _ in fixed]
            ys = [r["score"] for _, r in fixed]
            err = [
                [r["score"] - r["score_low"] for _, r in fixed],
                [r["score_high"] - r["score"] for _, r in fixed],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=colors[mode], label=f"{mode}")
        ref = next((r for r in mine if r["alpha"] == REFERENCE), None)
        if ref is not None:
            ax.axhline(
                ref["score"], color=colors[mode], linestyle="--", linewidth=1, label=f"{mode}: reference"
            )
        auto = next((r for r in mine if r["alpha"] == "auto" and r.get("alpha_final") is not None), None)
        if auto is not None:
            x = float(auto["alpha_final"])
            alpha_star.append(x)
            yerr = [[auto["score"] - auto["score_low"]], [auto["score_high"] - auto["score"]]]
            ax.errorbar([x], [auto["score"]], yerr=yerr, marker="*", markersize=12, capsize=4,
                        color=colors[mode], linestyle="none", label=f"{mode}: α = auto")  # fmt: skip
    if alpha_star:
        ax.axvline(float(np.mean(alpha_star)), color="gray", linestyle=":", label="α̂* (auto, final)")
    ax.set_xlabel("α (weight of the trace loss L_t)")
    ax.set_ylabel("held-out score")
    ax.set_xlim(-0.05, 1.05)
    ax.set_title("Held-out score against α (95% bootstrap intervals over prompts)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_study_report(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``<out_dir>/study.md`` and ``<out_dir>/study.png``."""
    chart = study_chart(rows, out_dir / "study.png")
    markdown = out_dir / "study.md"
    markdown.write_text(study_markdown(rows, chart.name), encoding="utf-8")
    return markdown, chart
