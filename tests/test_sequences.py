from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from pipeline.training.sequences import TokenizedPair, collate, pairs_batch, sequence_logps
from tests.tiny_lm import tiny_model


def _tiny_model() -> LlamaForCausalLM:
    return tiny_model(dtype=torch.float32).eval()


def _naive_logp(model: LlamaForCausalLM, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].log_softmax(-1)
    return float(sum(logits[len(prompt) + i - 1, tok] for i, tok in enumerate(response)))


def test_sequence_logps_sums_response_tokens_only_and_ignores_padding() -> None:
    model = _tiny_model()
    seqs = [([1, 2, 3], [4, 5]), ([7, 8], [9, 10, 11, 12]), ([3], [6])]
    batch = collate(seqs, pad_id=0)
    assert batch.input_ids.shape == (3, 6)
    with torch.no_grad():
        got = sequence_logps(model, batch)
    expected = torch.tensor([_naive_logp(model, p, r) for p, r in seqs])
    assert torch.allclose(got, expected, atol=1e-4)


def test_pairs_batch_puts_chosen_then_rejected() -> None:
    pairs = [TokenizedPair("a", [1], [2, 3], [4], False), TokenizedPair("b", [5], [6], [7, 8, 9], False)]
    batch = pairs_batch(pairs, pad_id=0)
    assert batch.input_ids[:, :2].tolist() == [[1, 2], [5, 6], [1, 4], [5, 7]]
    assert batch.response_mask.sum(1).tolist() == [2, 1, 1, 3]
