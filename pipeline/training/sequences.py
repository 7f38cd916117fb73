"""Batches of token sequences and summed response log-probabilities ``log π(response | prompt)``.

The sequences themselves come from :mod:`pipeline.training.encoding` (the stored ids, never re-tokenized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.training.encoding import TokenizedPair


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded sequences. Shapes: ``input_ids``, ``attention_mask``, ``response_mask``: ``[N, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """Build a batch from ``(prompt_ids, response_ids)`` sequences."""
    length = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    response = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (prompt, resp) in enumerate(sequences):
        total = len(prompt) + len(resp)
        ids[row, :total] = torch.tensor(prompt + resp, dtype=torch.long)
        attention[row, :total] = 1
        response[row, len(prompt) : total] = True
    return SequenceBatch(ids, attention, response)


def pairs_batch(pairs: Sequence[TokenizedPair], pad_id: int) -> SequenceBatch:
    """Chosen then rejected sequences of ``pairs`` in one batch (one forward pass per mode): ``[2B, T]``."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    return collate(sequences, pad_id)


HEAD_CHUNK = 256  # positions per LM-head chunk
# Logit elements (positions × vocabulary) above which the head's chunks are recomputed in the backward pass
# instead of kept: below it (e.g. 400 positions × 49k vocabulary ≈ 80 MB in fp32) keeping them is cheaper.
HEAD_CHECKPOINT_ELEMENTS = 1 << 25


def _chunk_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return -F.cross_entropy(logits, targets, reduction="none")


def _token_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``targets`` ``[M]`` from hidden states ``[M, H]``, in chunks of positions.

    With gradients on and more than ``HEAD_CHECKPOINT_ELEMENTS`` logits, each chunk is checkpointed: its
    ``[chunk, vocab]`` logits are recomputed in the backward pass instead of being kept, so the vocabulary
    projection never holds ``[M, vocab]`` at once.
    """
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else 0
    recompute = torch.is_grad_enabled() and hidden.shape[0] * vocab > HEAD_CHECKPOINT_ELEMENTS
    chunks = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        h, t = hidden[start : start + HEAD_CHUNK], targets[start : start + HEAD_CHUNK]
        if recompute:
            chunks.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            chunks.append(_chunk_logps(head, h, t))
    return torch.cat(chunks) if chunks else hidden.new_zeros(0)


def response_token_logps(model: Any, batch: SequenceBatch, full_forward: bool = False) -> list[torch.Tensor]:
    """The log-prob of every response token of each sequence, in order: ``N`` tensors of ``[R_i]``.

    The same computation as :func:`sequence_logps` (whose result is their sums); used by the reference pass
    to compare with the sampler's per-token log-probs (docs/method.md §Token-exact sequences).
    """
    token_logps, rows = _response_logps(model, batch, full_forward)
    return [token_logps[rows == i] for i in range(batch.input_ids.shape[0])]


def sequence_logps(model: Any, batch: SequenceBatch, full_forward: bool = False) -> torch.Tensor:
    """Summed log-probs of the response tokens of each sequence: ``[N]``.

    The LM head runs only on the positions that predict a response token (most of the vocabulary
    projection of the prompt is skipped), in checkpointed chunks to bound memory. ``full_forward`` calls the
    model itself instead (needed when wrappers such as FSDP act in the root module's forward).
    """
    token_logps, rows = _response_logps(model, batch, full_forward)
    return torch.zeros(
        batch.input_ids.shape[0], device=token_logps.device, dtype=token_logps.dtype
    ).index_add(0, rows, token_logps)


def _response_logps(
    model: Any, batch: SequenceBatch, full_forward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of all response tokens ``[M]`` (row-major) and the sequence each belongs to ``[M]``."""
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    attention = batch.attention_mask.to(device)
    # Position t predicts token t+1: targets are the response tokens, inputs the positions before them.
    predict = batch.response_mask[:, 1:].to(device)
    targets = input_ids[:, 1:][predict]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") and not full_forward else None
    head = model.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        token_logps = _token_logps(head, hidden[:, :-1][predict], targets)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][predict]
        token_logps = _chunk_logps(nn.Identity(), logits, targets)
    rows = torch.arange(input_ids.shape[0], device=device).unsqueeze(1).expand_as(predict)[predict]
    return token_logps, rows
