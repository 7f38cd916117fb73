"""DPO and BVPO losses (docs/method.md §The two estimators, §The BVPO mixture; arXiv 2510.05095)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PreferenceLogps:
    """Summed response log-probs of a batch of preference pairs, each of shape ``[B]``."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


@dataclass(frozen=True)
class DPOOutput:
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached


class DPOLoss(nn.Module):
    """Per-example DPO loss ``ℓ = −log σ(β[(log π_θ(c) − log π_ref(c)) − (log π_θ(r) − log π_ref(r))])``.

    Used for both estimators of docs/method.md §The two estimators: on (r, y) sequences it is ℓ_t, on
    (∅, y) sequences ℓ_e.

    Args:
        beta: DPO temperature β > 0.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta

    def forward(self, logps: PreferenceLogps) -> DPOOutput:
        """
        Args:
            logps: summed response log-probs, each ``[B]``.

        Returns:
            losses ``[B]`` and the implicit rewards ``β(log π_θ − log π_ref)`` of chosen and
            rejected, ``[B]`` each.
        """
        chosen_logratio = logps.policy_chosen - logps.ref_chosen
        rejected_logratio = logps.policy_rejected - logps.ref_rejected
        losses = -F.logsigmoid(self.beta * (chosen_logratio - rejected_logratio))
        return DPOOutput(
            losses=losses,
            chosen_rewards=(self.beta * chosen_logratio).detach(),
            rejected_rewards=(self.beta * rejected_logratio).detach(),
        )


@dataclass(frozen=True)
class BVPOOutput:
    loss: torch.Tensor  # scalar, carries the gradient g_c = α g_t + (1−α) g_e
    trace: DPOOutput | None
    empty: DPOOutput | None


class BVPOLoss(nn.Module):
    """``L_BVPO = α·L_t + (1−α)·L_e``, the batch means of ℓ_t and ℓ_e (docs/method.md §The BVPO mixture).

    α = 1 is DPO on traces, α = 0 DPO on empty traces. A mode whose weight is 0 may be passed as ``None``
    (its forward pass can then be skipped).

    Args:
        beta: DPO temperature β > 0, shared by both estimators.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.dpo = DPOLoss(beta)

    def forward(
        self, trace: PreferenceLogps | None, empty: PreferenceLogps | None, alpha: float
    ) -> BVPOOutput:
        """
        Args:
            trace: log-probs of a D_t batch (``[B_t]`` each), or ``None`` when ``alpha == 0``.
            empty: log-probs of a D_e batch (``[B_e]`` each), or ``None`` when ``alpha == 1``.
            alpha: mixing weight α ∈ [0, 1].

        Returns:
            the scalar loss and the per-mode DPO outputs.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if alpha > 0 and trace is None:
            raise ValueError("alpha > 0 needs a trace batch")
        if alpha < 1 and empty is None:
            raise ValueError("alpha < 1 needs an empty-trace batch")
        out_t = self.dpo(trace) if trace is not None else None
        out_e = self.dpo(empty) if empty is not None else None
        loss = torch.zeros(())
        if out_t is not None and alpha > 0:
            loss = loss.to(out_t.losses) + alpha * out_t.losses.mean()
        if out_e is not None and alpha < 1:
            loss = loss.to(out_e.losses) + (1.0 - alpha) * out_e.losses.mean()
        return BVPOOutput(loss=loss, trace=out_t, empty=out_e)

    def term(self, batch: PreferenceLogps, mode: str, alpha: float) -> tuple[torch.Tensor, DPOOutput]:
        """One mode's term of L_BVPO: ``α·L_t`` (``mode="trace"``) or ``(1−α)·L_e`` (``"empty"``).

        ``term(t) + term(e)`` equals :meth:`forward`'s loss, so a trainer may backpropagate the two terms
        one after the other and hold only one mode's activations at a time.

        Returns:
            the weighted scalar term and the mode's DPO outputs.
        """
        if mode not in ("trace", "empty"):
            raise ValueError(f"mode must be 'trace' or 'empty', got {mode!r}")
        out = self.dpo(batch)
        weight = alpha if mode == "trace" else 1.0 - alpha
        return weight * out.losses.mean(), out
