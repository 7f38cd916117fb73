"""The MSE-optimal mixing weight α*, its bootstrap interval and the MSE(α) curve, from per-example terms.

docs/method.md §MSE-optimal α: with G the marginal gradient, ``MSE(α) = E‖α g_t + (1−α) g_e − G‖²
= B − 2αN + α²D`` with ``N = E⟨g_e − G, g_e − g_t⟩``, ``D = E‖g_t − g_e‖²``, ``B = E‖g_e − G‖²``, minimized by

    α* = N / D        (clipped to [0, 1])

:func:`stats_from_terms` takes the per-example ``N, D, B`` (the gradient probe computes them under the
trainer's trace distribution, :mod:`pipeline.training.probe_estimator`) and returns α̂*, the curve on a
grid, and percentile-bootstrap intervals over examples. :func:`estimate_gradient_stats` builds the terms from
gradient samples (``g_t`` ``[N, K, D]``, ``g_e`` ``[N, D]``, ``Ĝ`` ``[N, D]`` or one per trace sample
``[N, K, D]``) for synthetic checks; :func:`marginal_gradient` is the self-normalized estimate of
docs/method.md §Estimating α*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHA_GRID = tuple(i / 10 for i in range(11))  # α values of the reported MSE(α) curve


@dataclass(frozen=True)
class GradientStats:
    """Bias–variance picture of one probe. Norms are over the D probed gradient dimensions."""

    alpha_star: float  # clip(numerator / denominator, 0, 1)
    ci_low: float  # percentile-bootstrap 95% interval of alpha_star over examples
    ci_high: float
    numerator: float  # E⟨g_e − Ĝ, g_e − g_t⟩
    denominator: float  # E‖g_t − g_e‖²
    trace_variance: float  # E_x tr Var_r[g_t] (NaN when not measurable)
    bias_t: float  # ‖E(g_t − Ĝ)‖
    bias_e: float  # ‖E(g_e − Ĝ)‖
    n: int
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    mse: tuple[float, ...] = ()  # MSE(α) = B − 2αN + α²D on alpha_grid
    mse_low: tuple[float, ...] = ()  # percentile-bootstrap 95% interval per grid point
    mse_high: tuple[float, ...] = ()
    empty_error: float = float("nan")  # B = E‖g_e − G‖²


def mse_at(alpha: float, empty_error: float, numerator: float, denominator: float) -> float:
    """``MSE(α) = B − 2αN + α²D`` (docs/method.md §MSE-optimal α: the quadratic in α)."""
    return empty_error - 2 * alpha * numerator + alpha**2 * denominator


def stats_from_terms(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    empty_error: torch.Tensor,
    *,
    trace_variance: float,
    bias_t: float,
    bias_e: float,
    bootstrap: int = 1000,
    seed: int = 0,
    grid: tuple[float, ...] = ALPHA_GRID,
) -> GradientStats:
    """α̂* and the MSE(α) curve from per-example terms ``[N]``, with bootstrap intervals over examples.

    ``α̂* = clip(mean N / mean D, 0, 1)``; ``MSE(α) = mean B − 2α mean N + α² mean D`` on ``grid``.
    """
    numerator, denominator, empty_error = numerator.double(), denominator.double(), empty_error.double()
    n = int(numerator.shape[0])
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (bootstrap, n), generator=generator)
    boot = sorted(alpha_from_terms(numerator[idx], denominator[idx]) for idx in draws)
    alphas = torch.tensor(grid, dtype=torch.float64)

    def curve(idx: torch.Tensor | slice) -> torch.Tensor:
        b, nu, de = empty_error[idx].mean(-1), numerator[idx].mean(-1), denominator[idx].mean(-1)
        return b.unsqueeze(-1) - 2 * alphas * nu.unsqueeze(-1) + alphas**2 * de.unsqueeze(-1)

    point = curve(slice(None))
    boot_curves = curve(draws).sort(0).values  # [bootstrap, len(grid)]
    low, high = int(0.025 * (bootstrap - 1)), int(0.975 * (bootstrap - 1))
    return GradientStats(
        alpha_star=alpha_from_terms(numerator, denominator),
        ci_low=boot[low],
        ci_high=boot[high],
        numerator=float(numerator.mean()),
        denominator=float(denominator.mean()),
        trace_variance=trace_variance,
        bias_t=bias_t,
        bias_e=bias_e,
        n=n,
        alpha_grid=tuple(grid),
        mse=tuple(point.tolist()),
        mse_low=tuple(boot_curves[low].tolist()),
        mse_high=tuple(boot_curves[high].tolist()),
        empty_error=float(empty_error.mean()),
    )


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


def _per_trace(g_hat: torch.Tensor, k: int) -> torch.Tensor:
    """Ĝ as ``[N, K, D]`` (an ``[N, D]`` estimate is shared by the K trace samples)."""
    return g_hat if g_hat.dim() == 3 else g_hat.unsqueeze(1).expand(-1, k, -1)


def _ratio_terms(
    g_t: torch.Tensor, g_e: torch.Tensor, g_hat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``⟨g_e − Ĝ, g_e − g_t⟩`` and ``‖g_t − g_e‖²`` averaged over traces: ``[N]`` each.

    These are the sample versions of the numerator and denominator of α* (docs/method.md §MSE-optimal α).
    """
    diff = g_e.unsqueeze(1) - g_t  # [N, K, D]
    numerator = ((g_e.unsqueeze(1) - _per_trace(g_hat, g_t.shape[1])) * diff).sum(-1).mean(1)
    denominator = diff.pow(2).sum(-1).mean(1)
    return numerator, denominator


def trace_variance(grads: torch.Tensor) -> float:
    """``E_x tr Var_r[g]`` from ``[N, K, D]`` samples (unbiased over the K traces; NaN when K < 2)."""
    if grads.shape[1] < 2:
        return float("nan")
    return float(grads.double().var(dim=1, unbiased=True).sum(-1).mean())


def alpha_from_terms(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """``clip(mean numerator / mean denominator, 0, 1)`` (docs/method.md §MSE-optimal α)."""
    den = float(denominator.mean())
    if den <= 0:
        return 1.0  # g_t == g_e: every α gives the same gradient
    return min(1.0, max(0.0, float(numerator.mean()) / den))


def estimate_gradient_stats(
    g_t: torch.Tensor, g_e: torch.Tensor, g_hat: torch.Tensor, *, bootstrap: int = 1000, seed: int = 0
) -> GradientStats:
    """α̂* and the bias–variance terms from per-example gradients.

    ``α̂* = clip(E⟨g_e − Ĝ, g_e − g_t⟩ / E‖g_t − g_e‖², 0, 1)`` (docs/method.md §MSE-optimal α), with
    a percentile-bootstrap interval over examples.

    Args:
        g_t: ``[N, K, D]`` trace-based gradients (K sampled traces per example).
        g_e: ``[N, D]`` empty-trace gradients.
        g_hat: marginal-gradient estimates Ĝ: ``[N, D]``, or ``[N, K, D]`` with one estimate per trace
            sample (built from the other traces of the example).
        bootstrap: resamples of the N examples for the interval.
    """
    shared = g_hat.dim() == 2 and g_hat.shape == g_e.shape
    per_trace = g_hat.dim() == 3 and g_hat.shape == g_t.shape
    if g_t.dim() != 3 or g_e.dim() != 2 or g_t.shape[0] != g_e.shape[0] or not (shared or per_trace):
        raise ValueError(
            f"expected g_t [N,K,D], g_e [N,D] and g_hat [N,D] or [N,K,D]; "
            f"got {tuple(g_t.shape)}, {tuple(g_e.shape)}, {tuple(g_hat.shape)}"
        )
    g_t, g_e, g_hat = g_t.double(), g_e.double(), g_hat.double()
    k = g_t.shape[1]
    numerator, denominator = _ratio_terms(g_t, g_e, g_hat)
    g_hat_k = _per_trace(g_hat, k)
    empty_error = (g_e.unsqueeze(1) - g_hat_k).pow(2).sum(-1).mean(1)  # plug-in B per example
    return stats_from_terms(
        numerator,
        denominator,
        empty_error,
        trace_variance=trace_variance(g_t),
        bias_t=float((g_t - g_hat_k).mean((0, 1)).norm()),
        bias_e=float((g_e.unsqueeze(1) - g_hat_k).mean((0, 1)).norm()),
        bootstrap=bootstrap,
        seed=seed,
    )


def mixture_mse(alpha: float, g_t: torch.Tensor, g_e: torch.Tensor, g: torch.Tensor) -> float:
    """Empirical ``MSE(α) = E‖α g_t + (1−α) g_e − G‖²`` (docs/method.md §MSE-optimal α).

    g_t ``[N, K, D]``, g_e ``[N, D]``, G ``[N, D]`` or ``[N, K, D]`` (per trace sample).
    """
    mixed = alpha * g_t + (1 - alpha) * g_e.unsqueeze(1)
    return float((mixed - _per_trace(g, g_t.shape[1])).pow(2).sum(-1).mean())


class AlphaController:
    """``alpha: auto``: an EMA of α̂* kept within configured bounds ``[low, high]``.

    ``value ← clip(decay · value + (1 − decay) · α̂*, low, high)`` after each probe; ``initial`` is the
    value the EMA starts from.
    """

    def __init__(self, initial: float, decay: float = 0.9, low: float = 0.0, high: float = 1.0) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"bounds must satisfy 0 <= low <= high <= 1, got {low}, {high}")
        self.low, self.high, self.decay = low, high, decay
        self.value = min(high, max(low, initial))

    def update(self, alpha_hat: float) -> float:
        """Fold one α̂* into the EMA and return the new (clipped) α."""
        self.value = min(self.high, max(self.low, self.decay * self.value + (1 - self.decay) * alpha_hat))
        return self.value
