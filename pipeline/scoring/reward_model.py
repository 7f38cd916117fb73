"""Reward-model scorer: any Hugging Face sequence-classification reward model (e.g. Skywork-Reward-V2).

Each (prompt, final answer) is rendered with the model's chat template as a user turn and an assistant
turn, tokenized, and scored in length-sorted, right-padded batches (right padding keeps every real
token's position, so a score does not depend on its batch). Conversations longer than ``max_length``
lose their start (the end of the answer and the template's closing tokens, where the reward is read, are
kept) and are flagged: check ``within_max_length`` is False. bf16 on GPU, fp32 on CPU unless configured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pipeline.config import RewardModelOptions
from pipeline.scoring.base import ScoreInput, ScoreResult


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    """The chat a reward model scores: the prompt as the user turn, the final answer as the assistant's."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sigmoid(value: float) -> float:
    """Numerically safe logistic function."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)


class RewardModelScorer:
    """Scores final answers with a sequence-classification reward model (loaded on first use)."""

    name = "reward_model"

    def __init__(self, options: RewardModelOptions) -> None:
        self.options = options
        self._device = None if options.device == "auto" else options.device
        self._model: Any = None
        self._tokenizer: Any = None
        self._pad_id = 0

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        opts = self.options
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(opts.dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(opts.model, trust_remote_code=opts.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            opts.model, dtype=dtype, trust_remote_code=opts.trust_remote_code
        )
        model.to(device).eval()
        # The head reads the last token that is not padding, so padding must use the id the model expects.
        text_config = model.config.get_text_config()
        pad_id = text_config.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_id is None:
                raise ValueError(f"{opts.model}: neither the model nor its tokenizer defines a pad/eos token")
            text_config.pad_token_id = pad_id
        self._pad_id = int(pad_id)
        self._model, self._tokenizer, self._device = model, tokenizer, device

    def encode(self, item: ScoreInput) -> tuple[list[int], bool]:
        """Token ids of the rendered conversation (truncated from the left) and whether it was truncated."""
        if self._tokenizer is None:
            self._load()
        text = self._tokenizer.apply_chat_template(conversation(item.prompt, item.answer), tokenize=False)
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.options.max_length
        return (ids[-limit:], True) if len(ids) > limit else (ids, False)

    def score_batch(self, items: Sequence[ScoreInput]) -> list[ScoreResult]:
        """One result per item; the score is the raw reward, or its sigmoid if so configured."""
        import torch

        encoded = [self.encode(item) for item in items]
        rewards: list[float] = [math.nan] * len(items)
        batches = length_sorted_batches([len(ids) for ids, _ in encoded], self.options.batch_size)
        for batch in tqdm(batches, desc="reward model", unit="batch", disable=len(batches) < 2):
            width = max(len(encoded[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i][0]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, : len(ids)] = 1
            with torch.inference_mode():
                out = self._model(
                    input_ids=input_ids.to(self._device), attention_mask=attention.to(self._device)
                )
            values = self._rewards(out)
            for row, i in enumerate(batch):
                rewards[i] = values[row]
        results = []
        for (ids, truncated), raw in zip(encoded, rewards, strict=True):
            score = sigmoid(raw) if self.options.normalize == "sigmoid" and math.isfinite(raw) else raw
            results.append(
                ScoreResult(
                    score=score,
                    checks={"within_max_length": not truncated},
                    details={"raw_reward": raw, "tokens": len(ids), "truncated": truncated},
                )
            )
        return results

    def _rewards(self, out: Any) -> list[float]:
        """Rewards of a batch: ``out.score`` (custom heads such as ArmoRM) or one column of the logits."""
        import torch

        score = getattr(out, "score", None)
        if isinstance(score, torch.Tensor):
            values = score.reshape(score.shape[0], -1)[:, 0]
        else:
            logits = out.logits
            if self.options.label_index >= logits.shape[-1]:
                raise ValueError(
                    f"label_index {self.options.label_index} is out of range: the model has "
                    f"{logits.shape[-1]} output(s)"
                )
            values = logits[:, self.options.label_index]
        return [float(v) for v in values.float().cpu()]

    def close(self) -> None:
        """Release the model (GPU memory is returned to the caller)."""
        self._model = None
        self._tokenizer = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
