"""Per-prompt terms of α* from stored traces, under the distribution the trainer actually uses.

docs/method.md §Probe estimator. One probe prompt ``x`` has a preference ``(y⁺, y⁻)`` (index ``a`` = 0, 1) and
``M`` stored reasoning-on traces ``r_1..r_M``, drawn by the sampler ``q`` (temperature, top-p, trace budget)
independently of which answers they led to. For every trace ``j`` and answer ``a`` the caller supplies
``log π_θ(r_j, y_a | x)`` and its (projected) gradient, ``log π_ref(r_j, y_a | x)``, ``log q(r_j | x)``
(forced tokens count log 1) and ``log q(y_a | x, r_j)`` (the answer under the processed sampler distribution).

- **g_t as the trainer draws it.** A ``D_t`` pair's trace ``r⁺`` was sampled jointly with ``y⁺`` and kept for
  ``y⁺``'s score, so given ``y⁺`` it is a draw from ``q(r | x, y⁺) ∝ q(r | x) q(y⁺ | x, r)``. The stored
  traces are draws from ``q(r | x)``, so sampling-importance-resampling gives that posterior with weights
  ``ω_j^a ∝ q(y_a | x, r_j)``. Instead of resampling, expectations are taken under the weighted empirical
  measure exactly (``r⁺``, ``r⁻`` independent: the product weights ``ω_i⁰ ω_j¹`` over all M² pairs).
- **Ĝ** (``∇`` of the marginal DPO loss) by self-normalized importance sampling with the same proposal:
  ``∇ log π_θ(y | x) ≈ Σ_k w_k ∇ log π_θ(r_k, y | x)``, ``w_k ∝ π_θ(r_k, y | x) / q(r_k | x)``; the marginal
  log-ratios in the sigmoid from the same samples. In the numerator the Ĝ of a pair ``(i, j)`` leaves traces
  ``i`` and ``j`` out, so ``⟨Ĝ, g_t⟩`` carries no shared-trace covariance.
- ``B = ‖g_e − G‖²`` (for the MSE curve) from two Ĝ on disjoint halves of the traces, whose product is free of
  Ĝ's own variance.

Every term is a function of the Gram matrix of the ``2M + 1`` vectors ``∇ log π_θ(r_j, y_a | x)`` and ``g_e``,
so the D dimensions enter once. Self-normalized weights make every term consistent with an O(1/M) bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptSamples:
    """What the probe measures on one prompt. ``M`` traces, answers ``a`` = 0 (chosen), 1 (rejected)."""

    policy: torch.Tensor  # [M, 2] log π_θ(r_j, y_a | x)
    grads: torch.Tensor  # [M, 2, D] ∇ log π_θ(r_j, y_a | x)
    reference: torch.Tensor  # [M, 2] log π_ref(r_j, y_a | x)
    trace_logq: torch.Tensor  # [M] log q(r_j | x)
    answer_logq: torch.Tensor  # [M, 2] log q(y_a | x, r_j)
    empty_policy: torch.Tensor  # [2] log π_θ(∅, y_a | x)
    empty_grads: torch.Tensor  # [2, D]
    empty_reference: torch.Tensor  # [2]


@dataclass(frozen=True)
class PromptTerms:
    """The per-prompt terms of α* and of the MSE curve (docs/method.md §MSE-optimal α)."""

    numerator: float  # ⟨g_e − G, g_e − E g_t⟩
    denominator: float  # E‖g_t − g_e‖²
    empty_error: float  # ‖g_e − G‖² (B)
    trace_var: float  # tr Var[g_t] under the posterior
    mean_t: torch.Tensor  # [D] E g_t
    g_hat: torch.Tensor  # [D] Ĝ from all M traces
    g_e: torch.Tensor  # [D]
    ess_posterior: float  # min over answers of 1 / Σ ω²  (posterior weights of g_t)
    ess_marginal: float  # min over answers of 1 / Σ w²  (weights of Ĝ)


def dpo_coefficient(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """``∂ℓ/∂m`` of ``ℓ = −log σ(β m)``: ``−β σ(−β m)``."""
    return -beta * torch.sigmoid(-beta * margin)


def processed_log_softmax(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs ``[..., V]`` of the processed sampler distribution: ``softmax(logits / T)`` kept to its top-p
    nucleus and renormalized (−inf outside it), as vLLM applies temperature, then top-p.

    The nucleus is the smallest set of most probable tokens whose mass reaches ``top_p`` (at least one token);
    ``temperature`` 0 is greedy (log 1 for the most probable token).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature <= 0:
        best = logits.argmax(-1, keepdim=True)
        out = torch.full_like(logits, -math.inf)
        return out.scatter(-1, best, 0.0)
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = logp.masked_fill(drop, -math.inf)
    return kept - torch.logsumexp(kept, -1, keepdim=True)


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """Kish's ``(Σ w)² / Σ w²`` of unnormalized log-weights ``[M]``."""
    w = torch.softmax(log_weights, 0)
    return float(1.0 / w.pow(2).sum())


def _marginal_coefficients(
    samples: PromptSamples, keep: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-normalized Ĝ over kept traces: weights ``[..., M, 2]`` (0 where not kept) and the DPO coefficient.

    ``keep`` ``[..., M]`` (bool) selects the traces of each estimate; returns ``(w⁰, w¹, c)`` with
    ``Ĝ = c (Σ_k w⁰_k ∇⁰_k − Σ_k w¹_k ∇¹_k)``.
    """
    off = torch.where(keep, 0.0, -math.inf).to(samples.policy.dtype)
    lq = samples.trace_logq.unsqueeze(-1)  # [M, 1]
    log_w = samples.policy - lq + off.unsqueeze(-1)  # [..., M, 2]
    log_ref = samples.reference - lq + off.unsqueeze(-1)
    weights = torch.softmax(log_w, dim=-2)
    # log π̂_θ(y|x) − log π̂_ref(y|x): the 1/|K| of both means cancels.
    ratio = torch.logsumexp(log_w, dim=-2) - torch.logsumexp(log_ref, dim=-2)  # [..., 2]
    coefficient = dpo_coefficient(ratio[..., 0] - ratio[..., 1], beta)
    return weights[..., 0], weights[..., 1], coefficient


def _posterior_variance(
    a: torch.Tensor,
    omega0: torch.Tensor,
    omega1: torch.Tensor,
    norms: torch.Tensor,
    pp: torch.Tensor,
    pq: torch.Tensor,
    qq: torch.Tensor,
) -> float:
    """``tr Var[g_t]`` under the weighted posterior, as the weighted U-statistic
    ``½ E‖g_t(i,j) − g_t(i',j')‖²`` over ``i ≠ i'``, ``j ≠ j'`` (normalized by ``(1 − Σω⁰²)(1 − Σω¹²)``): with
    equal weights it is the unbiased variance of two independent samples; the plug-in weighted variance would
    be biased low by O(1/ESS).

    ``a_ij = ω⁰_i ω¹_j c_ij``, ``norms_ij = ‖g_t(i,j)‖²``, ``pp``, ``pq``, ``qq``: Gram blocks of ∇⁰, ∇¹.
    """
    z = (1 - omega0.pow(2).sum()) * (1 - omega1.pow(2).sum())
    if float(z) <= 1e-12:
        return float("nan")
    weight = omega0.unsqueeze(1) * omega1.unsqueeze(0)
    own = (weight * norms * (1 - omega0).unsqueeze(1) * (1 - omega1).unsqueeze(0)).sum()
    r, s = a.sum(1), a.sum(0)
    a2 = a.pow(2)
    # Σ_{i≠i', j≠j'} a_ij a_i'j' ⟨∇⁰_i − ∇¹_j, ∇⁰_i' − ∇¹_j'⟩ by blocks, with inclusion–exclusion on
    # i = i' and j = j'.
    t_pp = (
        r @ pp @ r
        - (pp.diag() * r.pow(2)).sum()
        - (pp * (a @ a.T)).sum()
        + (pp.diag().unsqueeze(1) * a2).sum()
    )
    t_qq = (
        s @ qq @ s
        - (qq.diag() * s.pow(2)).sum()
        - (qq * (a.T @ a)).sum()
        + (qq.diag().unsqueeze(0) * a2).sum()
    )
    t_pq = r @ pq @ s - (pq * a * r.unsqueeze(1)).sum() - (pq * a * s.unsqueeze(0)).sum() + (pq * a2).sum()
    return float((own - (t_pp - 2 * t_pq + t_qq)) / z)


def marginal_estimate(samples: PromptSamples, beta: float) -> torch.Tensor:
    """Ĝ ``[D]`` from all M traces: the gradient of the marginal DPO loss by self-normalized importance
    sampling with proposal ``q(r | x)`` (weights ``∝ π_θ(r_k, y | x) / q(r_k | x)``)."""
    keep = torch.ones(samples.policy.shape[0], dtype=torch.bool)
    w0, w1, c = _marginal_coefficients(samples, keep, beta)
    grads = samples.grads.to(w0.dtype)
    return c * (w0 @ grads[:, 0] - w1 @ grads[:, 1])


def prompt_terms(samples: PromptSamples, beta: float) -> PromptTerms:
    """α*'s terms of one prompt (module docstring). Needs M ≥ 4 traces and a finite ``answer_logq``.

    Raises:
        ValueError: on fewer than 4 traces, or an answer no stored trace leads to (``answer_logq`` all −inf).
    """
    m = samples.policy.shape[0]
    if m < 4:
        raise ValueError(f"the probe estimator needs at least 4 traces per prompt, got {m}")
    if not bool(torch.isfinite(samples.answer_logq).any(0).all()):
        raise ValueError("an answer has probability 0 under the sampler after every stored trace")
    dtype = torch.float64
    policy, reference = samples.policy.to(dtype), samples.reference.to(dtype)
    s = PromptSamples(
        policy,
        samples.grads.to(dtype),
        reference,
        samples.trace_logq.to(dtype),
        samples.answer_logq.to(dtype),
        samples.empty_policy.to(dtype),
        samples.empty_grads.to(dtype),
        samples.empty_reference.to(dtype),
    )
    # g_e and the Gram matrix of [∇⁰_1..∇⁰_M, ∇¹_1..∇¹_M, g_e].
    margin_e = (s.empty_policy[0] - s.empty_reference[0]) - (s.empty_policy[1] - s.empty_reference[1])
    g_e = dpo_coefficient(margin_e, beta) * (s.empty_grads[0] - s.empty_grads[1])
    vectors = torch.cat([s.grads[:, 0], s.grads[:, 1], g_e.unsqueeze(0)])
    gram = vectors @ vectors.T
    pp, pq, qq = gram[:m, :m], gram[:m, m : 2 * m], gram[m : 2 * m, m : 2 * m]
    pe, qe, ee = gram[:m, 2 * m], gram[m : 2 * m, 2 * m], gram[2 * m, 2 * m]

    # Posterior weights and g_t(i, j) = c_ij (∇⁰_i − ∇¹_j) for every pair.
    omega0 = torch.softmax(s.answer_logq[:, 0], 0)
    omega1 = torch.softmax(s.answer_logq[:, 1], 0)
    pair_w = omega0.unsqueeze(1) * omega1.unsqueeze(0)  # [M, M]
    margin = (policy[:, 0] - reference[:, 0]).unsqueeze(1) - (policy[:, 1] - reference[:, 1]).unsqueeze(0)
    c = dpo_coefficient(margin, beta)  # [M, M]
    sq = pp.diag().unsqueeze(1) + qq.diag().unsqueeze(0) - 2 * pq  # ‖∇⁰_i − ∇¹_j‖²
    t_dot_e = c * (pe.unsqueeze(1) - qe.unsqueeze(0))  # ⟨g_t(i,j), g_e⟩
    denominator = float((pair_w * (c.pow(2) * sq - 2 * t_dot_e + ee)).sum())
    a = (pair_w * c).sum(1)  # coefficient of ∇⁰_i in E g_t
    b = (pair_w * c).sum(0)  # coefficient of −∇¹_j
    mean_coef = torch.cat([a, -b, torch.zeros(1, dtype=dtype)])
    mean_t = mean_coef @ vectors
    unit_e = torch.zeros(2 * m + 1, dtype=dtype)
    unit_e[2 * m] = 1.0
    trace_var = _posterior_variance(pair_w * c, omega0, omega1, c.pow(2) * sq, pp, pq, qq)

    # Numerator with the Ĝ of pair (i, j) built from the other traces.
    index = torch.arange(m)
    keep = (index.view(1, 1, m) != index.view(m, 1, 1)) & (index.view(1, 1, m) != index.view(1, m, 1))
    w0, w1, c_g = _marginal_coefficients(s, keep, beta)  # [M, M, M], [M, M, M], [M, M]
    h_dot_e = c_g * (w0 @ pe - w1 @ qe)
    # ⟨Ĝ_ij, ∇⁰_i − ∇¹_j⟩ = Σ_k w⁰_ijk (pp[k,i] − pq[k,j]) − Σ_k w¹_ijk (pq[i,k] − qq[k,j]).
    h_dot_p = torch.einsum("ijk,ki->ij", w0, pp) - torch.einsum("ijk,kj->ij", w0, pq)
    h_dot_q = torch.einsum("ijk,ik->ij", w1, pq) - torch.einsum("ijk,kj->ij", w1, qq)
    h_dot_t = c_g * c * (h_dot_p - h_dot_q)
    numerator = float((pair_w * (ee - t_dot_e - h_dot_e + h_dot_t)).sum())

    # B = ‖g_e − G‖² from two halves; Ĝ and the weights' ESS from all traces.
    half = torch.zeros(2, m, dtype=torch.bool)
    half[0, : m // 2], half[1, m // 2 :] = True, True
    hw0, hw1, hc = _marginal_coefficients(s, half, beta)
    h_coef = torch.cat([hc.unsqueeze(1) * hw0, -hc.unsqueeze(1) * hw1, torch.zeros(2, 1, dtype=dtype)], 1)
    empty_error = float((unit_e - h_coef[0]) @ gram @ (unit_e - h_coef[1]))
    g_hat = marginal_estimate(s, beta)
    lq = s.trace_logq.unsqueeze(1)
    return PromptTerms(
        numerator=numerator,
        denominator=denominator,
        empty_error=empty_error,
        trace_var=trace_var,
        mean_t=mean_t,
        g_hat=g_hat,
        g_e=g_e,
        ess_posterior=min(float(1 / omega0.pow(2).sum()), float(1 / omega1.pow(2).sum())),
        ess_marginal=min(effective_sample_size(policy[:, a_] - lq[:, 0]) for a_ in (0, 1)),
    )
