"""Packed, prefix-shared forward: the same log-probs and gradients as the padded, unshared batch."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pipeline.training.encoding import TokenizedPair
from pipeline.training.packing import choose_row_tokens, pack_pairs, packed_logps, packed_mask, shares_prefix
from pipeline.training.sequences import pairs_batch, sequence_logps
from tests.tiny_lm import VOCAB, tiny_model


def _pairs(n: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(k)]

    return [
        TokenizedPair(f"p{i}", ids(rng.randint(1, 7)), ids(rng.randint(1, 8)), ids(rng.randint(1, 8)), False)
        for i in range(n)
    ]


def _sdpa_model() -> torch.nn.Module:
    # float64 SDPA keeps a float64 softmax; eager attention computes its softmax in float32.
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    return model


def _float64_rms_norm(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def float64_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF's RMSNorm runs in float32 whatever the model dtype, so its backward rounds each gradient to
    float32: the shared prompt's summed gradient and the two unshared ones round differently (~1e-7).
    Exactness to 1e-10 is about the layout, so these tests keep the norm in float64."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", _float64_rms_norm)


def _loss_and_grads(model: torch.nn.Module, logps_of: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = copy.deepcopy(model)
    logps = logps_of(model)  # type: ignore[operator]
    # A loss that weighs every sequence differently, so a swapped or dropped sequence changes the gradient.
    weights = torch.linspace(0.5, 2.0, logps.shape[0], dtype=logps.dtype)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("row_tokens", [4096, 16])
@pytest.mark.usefixtures("float64_norm")
def test_shared_prefix_logps_and_grads_equal_padded_unshared_in_float64(row_tokens: int) -> None:
    model, pairs = _sdpa_model(), _pairs(6, seed=3)
    packed = pack_pairs(pairs, pad_id=0, row_tokens=row_tokens)
    assert packed.shared_prefix and (packed.input_ids.shape[0] > 1) == (row_tokens == 16)
    expected, expected_grads = _loss_and_grads(model, lambda m: sequence_logps(m, pairs_batch(pairs, 0)))
    got, grads = _loss_and_grads(model, lambda m: packed_logps(m, packed))
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=0, atol=1e-10), name


@pytest.mark.usefixtures("float64_norm")
def test_unshared_packed_layout_equals_padded_in_float64() -> None:
    model, pairs = _sdpa_model(), _pairs(5, seed=4)
    packed = pack_pairs(pairs, pad_id=0, shared_prefix=False)
    expected, expected_grads = _loss_and_grads(model, lambda m: sequence_logps(m, pairs_batch(pairs, 0)))
    got, grads = _loss_and_grads(model, lambda m: packed_logps(m, packed))
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=0, atol=1e-10), name


def test_full_forward_path_matches_the_decoder_path() -> None:
    model, pairs = _sdpa_model(), _pairs(3, seed=5)
    packed = pack_pairs(pairs, pad_id=0)
    with torch.no_grad():
        assert torch.allclose(packed_logps(model, packed, full_forward=True), packed_logps(model, packed))


def test_eager_attention_takes_the_additive_mask() -> None:
    model, pairs = tiny_model(), _pairs(4, seed=6)  # eager: float32 softmax, so only ~1e-8 close
    with torch.no_grad():
        expected = sequence_logps(model, pairs_batch(pairs, 0))
        got = packed_logps(model, pack_pairs(pairs, pad_id=0))
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_layout_runs_the_prompt_once_and_pads_nothing_in_one_row() -> None:
    pairs = [TokenizedPair("a", [1, 2, 3], [4, 5], [6], False), TokenizedPair("b", [7], [8], [9, 10], False)]
    packed = pack_pairs(pairs, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2]]
    assert packed.forward_tokens == 10 and packed.num_tokens == 5 + 4 + 2 + 3
    # Read positions: chosen a ← 2 (last prompt), 3; rejected a ← 2; chosen b ← 6; rejected b ← 6, 8.
    assert packed.predict_index.tolist() == [2, 3, 2, 6, 6, 8]
    assert packed.targets.tolist() == [4, 5, 6, 8, 9, 10]
    assert packed.sequence_index.tolist() == [0, 0, 2, 1, 3, 3]  # chosen i → i, rejected i → B + i


def test_mask_keeps_each_response_to_its_prompt_and_itself() -> None:
    pairs = [TokenizedPair("a", [1, 2], [3, 4], [5], False), TokenizedPair("b", [6], [7], [8], False)]
    mask = packed_mask(pack_pairs(pairs, pad_id=0))[0, 0]
    rejected_a, chosen_a = 4, 3
    assert mask[rejected_a].tolist() == [True, True, False, False, True, False, False, False]
    assert mask[chosen_a].tolist() == [True, True, True, True, False, False, False, False]
    assert not mask[5:, :5].any()  # pair b sees nothing of pair a


def test_rows_split_at_pair_boundaries_and_padding_is_never_read() -> None:
    pairs = _pairs(4, seed=7)
    packed = pack_pairs(pairs, pad_id=0, row_tokens=1)  # one pair per row
    assert packed.input_ids.shape[0] == 4
    width = packed.input_ids.shape[1]
    real = packed.segment.reshape(-1) >= 0
    assert real.sum() == packed.forward_tokens
    assert real[packed.predict_index].all() and (packed.predict_index < 4 * width).all()


def test_empty_prompt_and_dense_mask_on_varlen_attention_are_errors() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        pack_pairs([TokenizedPair("a", [], [1], [2], False)], pad_id=0)
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    assert not shares_prefix(model)
    with pytest.raises(ValueError, match="shared_prefix=False"):
        packed_logps(model, pack_pairs(_pairs(1, seed=8), pad_id=0))


def test_row_budget_trades_dense_attention_against_padding() -> None:
    pairs = _pairs(6, seed=9)
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert len(set(sizes)) > 1
    # Free attention: one row, no padding at all; costly attention: one pair per row.
    assert pack_pairs(pairs, 0, row_tokens=choose_row_tokens(pairs, key_cost=0.0)).input_ids.shape[0] == 1
    assert choose_row_tokens(pairs, key_cost=10.0) == max(sizes)
    assert pack_pairs(pairs, 0, row_tokens=max(sizes)).input_ids.shape[0] == len(pairs)
