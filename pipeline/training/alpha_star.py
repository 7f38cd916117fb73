"""The MSE-optimal mixing weight α* and the trace-induced variance, estimated from gradient samples.

DESIGN.md §1: with G the marginal gradient, ``MSE(α) = E‖α g_t + (1−α) g_e − G‖²`` is minimized by

    α* = E⟨g_e − G, g_e − g_t⟩ / E‖g_t − g_e‖²        (clipped to [0, 1])

and the trace-induced variance of the mixture is ``Var_r[g_c] = α² Var_r[g_t]``. G is estimated per
(x, y) from K sampled traces with self-normalized weights ``w_k ∝ π_θ(y | x, r_k)``:
``Ĝ = Σ_k w_k ∇ log π_θ(r_k, y | x)`` (:func:`marginal_gradient`).

Shapes: N examples, K traces per example, D gradient dimensions (a parameter subset or a projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GradientStats:
    """Bias–variance picture of one probe. Norms are over the D probed gradient dimensions."""

    alpha_star: float  # clip(numerator / denominator, 0, 1)
    ci_low: float  # percentile-bootstrap 95% interval of alpha_star over examples
    ci_high: float
    numerator: float  # E⟨g_e − Ĝ, g_e − g_t⟩
    denominator: float  # E‖g_t − g_e‖²
    trace_variance: float  # E_x tr Var_r[g_t] (needs K ≥ 2; NaN otherwise)
    bias_t: float  # ‖E(g_t − Ĝ)‖
    bias_e: float  # ‖E(g_e − Ĝ)‖
    n: int


def marginal_gradient(trace_grads: torch.Tensor, answer_logps: torch.Tensor) -> torch.Tensor:
    """Self-normalized estimate of ∇ log π(y|x) from K traces.

    Args:
        trace_grads: ``[K, D]`` gradients of ``log π_θ(r_k, y | x)``.
        answer_logps: ``[K]`` values of ``log π_θ(y | x, r_k)`` (the answer teacher-forced after trace k).

    Returns:
        ``[D]``: ``Σ_k w_k ∇ log π_θ(r_k, y | x)`` with ``w = softmax(answer_logps)``.
    """
    weights = torch.softmax(answer_logps.to(trace_grads.dtype), dim=0)
    return weights @ trace_grads


def _ratio_terms(
    g_t: torch.Tensor, g_e: torch.Tensor, g_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``⟨g_e − Ĝ, g_e − g_t⟩`` and ``‖g_t − g_e‖²`` averaged over traces: ``[N]`` each."""
    diff = g_e.unsqueeze(1) - g_t  # [N, K, D]
    numerator = ((g_e - g_hat).unsqueeze(1) * diff).sum(-1).mean(1)
    denominator = diff.pow(2).sum(-1).mean(1)
    return numerator, denominator


def alpha_from_terms(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    den = float(denominator.mean())
    if den <= 0:
        return 1.0  # g_t == g_e: every α gives the same gradient
    return min(1.0, max(0.0, float(numerator.mean()) / den))


def estimate_gradient_stats(
    g_t: torch.Tensor, g_e: torch.Tensor, g_hat: torch.Tensor, *, bootstrap: int = 1000, seed: int = 0
) -> GradientStats:
    """α̂* and the bias–variance terms from per-example gradients.

    Args:
        g_t: ``[N, K, D]`` trace-based gradients (K sampled traces per example).
        g_e: ``[N, D]`` empty-trace gradients.
        g_hat: ``[N, D]`` marginal-gradient estimates Ĝ.
        bootstrap: resamples of the N examples for the interval.
    """
    if g_t.dim() != 3 or g_e.shape != g_hat.shape or g_t.shape[0] != g_e.shape[0]:
        raise ValueError(
            f"expected g_t [N,K,D], g_e and g_hat [N,D]; got {g_t.shape}, {g_e.shape}, {g_hat.shape}"
        )
    g_t, g_e, g_hat = g_t.double(), g_e.double(), g_hat.double()
    n, k, _ = g_t.shape
    numerator, denominator = _ratio_terms(g_t, g_e, g_hat)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (bootstrap, n), generator=generator)
    boot = sorted(alpha_from_terms(numerator[idx], denominator[idx]) for idx in draws)
    trace_variance = float(g_t.var(dim=1, unbiased=True).sum(-1).mean()) if k >= 2 else float("nan")
    return GradientStats(
        alpha_star=alpha_from_terms(numerator, denominator),
        ci_low=boot[int(0.025 * (bootstrap - 1))],
        ci_high=boot[int(0.975 * (bootstrap - 1))],
        numerator=float(numerator.mean()),
        denominator=float(denominator.mean()),
        trace_variance=trace_variance,
        bias_t=float((g_t - g_hat.unsqueeze(1)).mean((0, 1)).norm()),
        bias_e=float((g_e - g_hat).mean(0).norm()),
        n=n,
    )


def mixture_mse(alpha: float, g_t: torch.Tensor, g_e: torch.Tensor, g: torch.Tensor) -> float:
    """Empirical ``E‖α g_t + (1−α) g_e − G‖²`` (g_t ``[N, K, D]``, g_e and G ``[N, D]``)."""
    mixed = alpha * g_t + (1 - alpha) * g_e.unsqueeze(1)
    return float((mixed - g.unsqueeze(1)).pow(2).sum(-1).mean())


class AlphaController:
    """``alpha: auto``: an EMA of α̂* kept within configured bounds."""

    def __init__(self, initial: float, decay: float = 0.9, low: float = 0.0, high: float = 1.0) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"bounds must satisfy 0 <= low <= high <= 1, got {low}, {high}")
        self.low, self.high, self.decay = low, high, decay
        self.value = min(high, max(low, initial))

    def update(self, alpha_hat: float) -> float:
        self.value = min(self.high, max(self.low, self.decay * self.value + (1 - self.decay) * alpha_hat))
        return self.value
