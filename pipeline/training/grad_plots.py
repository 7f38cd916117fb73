"""The gradient probe's picture as one PNG: α̂* over steps, the MSE(α) curve, the measured trace variance.

Left: α̂* of each probe with its bootstrap interval, and the α trained with at each step (docs/method.md
§MSE-optimal α). Middle: the estimated ``MSE(α) = B − 2αN + α²D`` of the last probe on its grid, with the
bootstrap band. Right: the measured ``tr Var_r[g_t]`` (posterior traces) over steps, and the smallest
effective sample size of a prompt's importance weights (docs/method.md §Probe estimator).
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
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
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

    last = rows[-1] if rows else None
    if last is not None and last.get("mse_grid"):
        grid = last["alpha_grid"]
        middle.fill_between(grid, last["mse_grid_low"], last["mse_grid_high"], alpha=0.25, label="95% band")
        middle.plot(grid, last["mse_grid"], marker=".", label=f"MSE(α), step {last['step']}")
        middle.axvline(last["alpha_hat"], color="k", linestyle="--", linewidth=1, label="α̂*")
        middle.legend(fontsize=8)
    middle.set_xlabel("α")
    middle.set_title("estimated MSE of g_c against G")
    middle.grid(alpha=0.3)

    var_t = [r["trace_var_t"] for r in rows]
    right.plot(steps, var_t, marker="o", label="tr Var_r[g_t] (measured)")
    if rows and all(v is not None and v > 0 for v in var_t):
        right.set_yscale("log")
    right.set_xlabel("optimizer steps before the probe")
    right.set_title("trace-induced variance of g_t")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left")
    if rows and all(r.get("ess_min") is not None for r in rows):
        ess = right.twinx()
        ess.plot(steps, [r["ess_min"] for r in rows], color="tab:red", marker="x", label="min ESS")
        ess.set_ylabel("min effective traces per prompt")
        ess.legend(fontsize=8, loc="upper right")
    if last is not None:
        fig.suptitle(
            f"{title}: {last['n_prompts']} prompts × {last['traces_per_prompt']} stored traces, "
            f"{last['params']} gradients, D = {last['dim']}"
        )
    else:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
