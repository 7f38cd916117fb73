from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.loss import BVPOLoss, DPOLoss, PreferenceLogps


def _logps(
    pc: list[float], pr: list[float], rc: list[float], rr: list[float], grad: bool = False
) -> PreferenceLogps:
    t = lambda v: torch.tensor(v, requires_grad=grad)  # noqa: E731
    return PreferenceLogps(t(pc), t(pr), t(rc), t(rr))


def test_dpo_loss_matches_closed_form() -> None:
    out = DPOLoss(beta=0.5)(_logps([-1.0], [-3.0], [-2.0], [-2.0]))
    # margin = 0.5 * ((-1 + 2) - (-3 + 2)) = 1.0
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_policy_equal_to_reference_gives_log2() -> None:
    out = DPOLoss(beta=0.1)(_logps([-5.0, -2.0], [-4.0, -9.0], [-5.0, -2.0], [-4.0, -9.0]))
    assert torch.allclose(out.losses, torch.full((2,), math.log(2.0)))


def test_bvpo_mixes_the_two_losses_with_alpha() -> None:
    trace = _logps([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0])
    empty = _logps([-0.5], [-4.0], [-1.0], [-1.0])
    dpo = DPOLoss(0.1)
    lt, le = dpo(trace).losses.mean(), dpo(empty).losses.mean()
    for alpha in (0.0, 0.3, 0.5, 1.0):
        out = BVPOLoss(0.1)(trace, empty, alpha)
        assert out.loss.item() == pytest.approx(alpha * lt.item() + (1 - alpha) * le.item())


def test_bvpo_gradient_is_convex_combination() -> None:
    def grads(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        trace = _logps([-1.0], [-3.0], [-2.0], [-2.0], grad=True)
        empty = _logps([-0.5], [-4.0], [-1.0], [-1.0], grad=True)
        BVPOLoss(0.2)(trace, empty, alpha).loss.backward()
        zero = torch.zeros(1)
        gt, ge = trace.policy_chosen.grad, empty.policy_chosen.grad
        return (zero if gt is None else gt), (zero if ge is None else ge)

    gt1, ge1 = grads(1.0)
    gt0, ge0 = grads(0.0)
    gth, geh = grads(0.25)
    assert ge1.item() == 0.0 and gt0.item() == 0.0
    assert gth.item() == pytest.approx(0.25 * gt1.item())
    assert geh.item() == pytest.approx(0.75 * ge0.item())


def test_baselines_accept_a_missing_mode_and_reject_bad_alpha() -> None:
    trace = _logps([-1.0], [-3.0], [-2.0], [-2.0])
    assert BVPOLoss(0.1)(trace, None, 1.0).empty is None
    with pytest.raises(ValueError, match="empty-trace batch"):
        BVPOLoss(0.1)(trace, None, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        BVPOLoss(0.1)(trace, trace, 1.5)
    with pytest.raises(ValueError, match="beta"):
        BVPOLoss(0.0)
