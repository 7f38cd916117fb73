"""Training curves as one PNG: losses, implicit-reward accuracies and margins per mode, grad norm and lr."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_training_curves(metrics: Sequence[dict[str, Any]], path: Path, title: str = "BVPO training") -> Path:
    """Write a 2×2 panel figure of ``train_metrics`` rows to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]

    def series(key: str) -> list[float]:
        return [float("nan") if m.get(key) is None else m[key] for m in metrics]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("loss", [("loss", "L_BVPO"), ("loss_t", "L_t (trace)"), ("loss_e", "L_e (empty)")]),
        ("implicit-reward accuracy", [("reward_acc_t", "trace"), ("reward_acc_e", "empty")]),
        ("implicit-reward margin", [("reward_margin_t", "trace"), ("reward_margin_e", "empty")]),
        ("gradient norm", [("grad_norm", "‖g‖ before clipping")]),
    ]
    for ax, (name, lines) in zip(axes.flat, panels, strict=True):
        for key, label in lines:
            ax.plot(steps, series(key), marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    alphas = [m["alpha"] for m in metrics]
    if len(set(alphas)) > 1:  # alpha: auto (the gradient probe's α̂*, see grad_stats)
        fig.suptitle(f"{title} (α auto: {alphas[0]:.3g} → {alphas[-1]:.3g})")
    else:
        fig.suptitle(f"{title} (α = {alphas[0] if alphas else float('nan'):g})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
