"""The gradient probe's picture as one PNG: α̂* over steps, and the trace-induced variance BVPO removes.

Left: α̂* of each probe with its bootstrap interval, and the α trained with at each step (docs/method.md
§MSE-optimal α). Right: ``tr Var_r[g_t]`` against ``tr Var_r[g_c]`` of the mixed gradient
``g_c = α g_t + (1−α) g_e`` (``= α² tr Var_r[g_t]``, docs/method.md §The variance law), log scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_grad_stats(
    rows: Sequence[dict[str, Any]],
    path: Path,
    metrics: Sequence[dict[str, Any]] | None = None,
    title: str = "BVPO gradient probe",
) -> Path:
    """Write the figure of ``grad_stats`` rows (and the α of ``train_metrics`` rows, if given) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if rows:
        hat = [r["alpha_hat"] for r in rows]
        low = [max(0.0, h - r["ci_low"]) for h, r in zip(hat, rows, strict=True)]
        high = [max(0.0, r["ci_high"] - h) for h, r in zip(hat, rows, strict=True)]
        left.errorbar(steps, hat, yerr=[low, high], fmt="o", capsize=3, label="α̂* (95% bootstrap CI)")
    if metrics:
        # train_metrics steps count from 1; a probe at step s sets the α of optimizer step s + 1.
        left.step(
            [m["step"] - 1 for m in metrics], [m["alpha"] for m in metrics], where="post", label="α used"
        )
    elif rows:
        left.step(steps, [r["alpha"] for r in rows], where="post", label="α used")
    left.set_ylim(-0.05, 1.05)
    left.set_xlabel("optimizer steps before the probe")
    left.set_title("MSE-optimal mixing weight")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    var_t = [r["trace_var_t"] for r in rows]
    var_c = [r["trace_var_c"] for r in rows]
    right.plot(steps, var_t, marker="o", label="tr Var_r[g_t] (α = 1)")
    right.plot(steps, var_c, marker="s", label="tr Var_r[g_c] (α used)")
    if rows and all(v is not None and v > 0 for v in var_t + var_c):
        right.set_yscale("log")
    right.set_xlabel("optimizer steps before the probe")
    right.set_title("trace-induced gradient variance")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    if rows:
        last = rows[-1]
        fig.suptitle(
            f"{title}: {last['n_prompts']} prompts × {last['pairs_per_prompt']} trace pairs, "
            f"{last['params']} gradients, D = {last['dim']}"
        )
    else:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
