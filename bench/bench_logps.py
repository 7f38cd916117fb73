"""Benchmark: response log-probs with the LM head on response positions only vs full logits + log_softmax.

Both are measured in the same run on the embedded SmolLM2-135M checkpoint (forward + backward, bf16
autocast and fp32), and the script prints the speed ratio and peak-RSS growth of each.

    .venv/bin/python bench/bench_logps.py --steps 3
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import torch

from pipeline.model_assets import embedded_checkpoint
from pipeline.training.modeling import autocast, load_model_and_tokenizer
from pipeline.training.sequences import SequenceBatch, collate, sequence_logps


def naive_logps(model: Any, batch: SequenceBatch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = logits.float().log_softmax(-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * batch.response_mask[:, 1:]).sum(-1)


def time_fn(fn: Any, model: Any, batch: SequenceBatch, bf16: bool, steps: int) -> float:
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast(bf16):
            loss = fn(model, batch).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps  # first call is warm-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=80)
    parser.add_argument("--response-tokens", type=int, default=150)
    parser.add_argument("--sequences", type=int, default=8)
    args = parser.parse_args()
    model, _ = load_model_and_tokenizer(str(embedded_checkpoint()), False)
    prompt = list(range(100, 100 + args.prompt_tokens))
    response = list(range(1000, 1000 + args.response_tokens))
    batch = collate([(prompt, response)] * args.sequences, pad_id=0)
    tokens = batch.num_tokens
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.sequences} x {tokens // args.sequences} tokens"
    )
    for bf16 in (False, True):
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base = time_fn(naive_logps, model, batch, bf16, args.steps)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ours = time_fn(sequence_logps, model, batch, bf16, args.steps)
        label = "bf16" if bf16 else "fp32"
        print(
            f"{label}: full-logits baseline {base:.2f} s/step ({tokens / base:.0f} tok/s), "
            f"response-only head {ours:.2f} s/step ({tokens / ours:.0f} tok/s), speed-up x{base / ours:.2f}; "
            f"peak RSS growth during baseline {(rss1 - rss0) / 1024:.0f} MB"
        )


if __name__ == "__main__":
    main()
