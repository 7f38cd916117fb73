"""Benchmark: wall time the gradient probe adds to BVPO training (target ≤ 10% at the default probe settings).

One process, the embedded SmolLM2-135M checkpoint, the default TrainConfig (batch_size 2 pairs per mode,
bf16 autocast) and the default probe (``train.probe``: 4 prompts × 4 stored traces, LM-head gradients sketched
to D = 4096, every 10 steps). Two trainers start from the same weights: A without the probe, B with it
(``probe.enabled`` at the same fixed α, so both compute the same loss). After one untimed warm-up step each
(B's includes the probe before step 0), each runs ``--steps`` timed steps, alternating A and B in rounds so
that both see the same load on a shared CPU; with ``--steps`` equal to ``probe.every`` each timed block of B
holds exactly one probe. Reported: ``B / A − 1`` (the added wall time, the target) and the probe's own seconds
over A's time.

Synthetic data shaped like the pipeline's, as token-exact rows: chat prompts, reasoning-on responses of
``<think>`` + about ``--trace-tokens`` words + an answer of about ``--answer-tokens`` words, and their
reasoning-off twins; the probe reads them as stored generations (``build_probe``), exactly as in training.

    .venv/bin/python bench/bench_probe.py [--steps 10] [--rounds 1] [--every 10]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

SENTENCE = (
    "the river carries light across the valley while small boats drift past old stone bridges and the "
    "morning air smells of rain so we check each step again before we answer"
)
WORDS = SENTENCE.split(" ")


def _text(rng: random.Random, words: int) -> str:
    start = rng.randrange(len(WORDS))
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(words))


def make_data(
    tokenizer: Any, prompts: int, samples: int, trace_tokens: int, answer_tokens: int
) -> dict[str, Any]:
    """Generations (both modes, ``samples`` per prompt) and a pair per prompt and mode, token-exact."""
    from pipeline.prompts.builtin import build_builtin_prompts
    from pipeline.training.encoding import encode_text

    rng = random.Random(0)
    eos = tokenizer.eos_token_id
    gens: list[dict[str, Any]] = []
    pairs: dict[str, list[dict[str, Any]]] = {"trace": [], "empty": []}
    for i, prompt in enumerate(build_builtin_prompts(prompts, seed=7)):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = encode_text(tokenizer, text)
        for mode in ("trace", "empty"):
            rows = []
            for k in range(samples):
                if mode == "trace":
                    pieces = [("<think>\n", 0), (_text(rng, trace_tokens), 1), ("\n</think>\n\n", 1)]
                else:
                    pieces = [("<think>\n\n</think>\n\n", 0)]
                answer = _text(rng, answer_tokens)
                pieces.append((answer, 3))
                ids, segments = [], []
                for piece, segment in pieces:
                    piece_ids = encode_text(tokenizer, piece)
                    ids += piece_ids
                    segments += [segment] * len(piece_ids)
                rows.append(
                    {"generation_id": f"p{i}-{mode}-{k}", "prompt_id": f"p{i}", "mode": mode,
                     "sample_index": k, "prompt_text": text, "answer": answer,
                     "response_text": "".join(t for t, _ in pieces),
                     "prompt_token_ids": prompt_ids, "response_token_ids": [*ids, eos],
                     "response_segments": [*segments, 4], "eos_emitted": True, "temperature": 0.8,
                     "top_p": 0.95}
                )  # fmt: skip
            gens += rows
            best, worst = rows[0], rows[1]
            pairs[mode].append(
                {"pair_id": f"p{i}-{mode}", "prompt_id": f"p{i}", "prompt_text": text,
                 "chosen_generation_id": best["generation_id"],
                 "rejected_generation_id": worst["generation_id"],
                 "prompt_token_ids": prompt_ids, "chosen_token_ids": best["response_token_ids"],
                 "rejected_token_ids": worst["response_token_ids"]}
            )  # fmt: skip
    return {"generations": gens, "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block (default: probe.every)")
    parser.add_argument("--rounds", type=int, default=1, help="A/B blocks, alternating")
    parser.add_argument("--every", type=int, default=None, help="probe interval (default: ProbeConfig's)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--trace-tokens", type=int, default=100)
    parser.add_argument("--answer-tokens", type=int, default=40)
    args = parser.parse_args()

    import torch

    from pipeline.config import ProbeConfig, TrainConfig
    from pipeline.model_assets import embedded_checkpoint
    from pipeline.training.encoding import pair_tokens
    from pipeline.training.grad_probe import build_probe
    from pipeline.training.modeling import load_model_and_tokenizer
    from pipeline.training.trainer import BVPOTrainer, RefPair

    path = str(embedded_checkpoint())
    probe_settings = ProbeConfig(enabled=True, **({"every": args.every} if args.every else {}))
    base = {
        "alpha": 0.5,
        "max_steps": 10_000,
        "learning_rate": 1e-6,
        "checkpoint_every": 0,
        "warmup_steps": 0,
    }
    configs = {
        "A": TrainConfig.model_validate(base),
        "B": TrainConfig.model_validate({**base, "probe": probe_settings.model_dump()}),
    }
    trainers: dict[str, BVPOTrainer] = {}
    data: dict[str, Any] = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer(path, False)
        if not data:
            data = make_data(tokenizer, args.prompts, 4, args.trace_tokens, args.answer_tokens)
        refs = {
            mode: [RefPair(pair_tokens(p), -100.0, -100.0) for p in rows]
            for mode, rows in data["pairs"].items()
        }
        probe = (
            build_probe(model, tokenizer, data["pairs"]["trace"], data["generations"], config)
            if config.probe_active
            else None
        )
        trainers[name] = BVPOTrainer(
            model, refs["trace"], refs["empty"], config, tokenizer.pad_token_id, probe
        )
        trainers[name].train_step()  # warm-up (B: with the probe before step 0), not timed
    elapsed = {"A": 0.0, "B": 0.0}
    for _ in range(args.rounds):
        for name in ("A", "B"):
            start = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].train_step()
            elapsed[name] += time.perf_counter() - start
    probe_rows = trainers["B"].probe.rows  # type: ignore[union-attr]
    timed_rows = [r for r in probe_rows if r["step"] >= 1]
    probe_seconds = sum(r["seconds"] for r in timed_rows)
    tokens = sum(m["tokens"] for m in trainers["A"].metrics[1:]) / max(1, len(trainers["A"].metrics) - 1)
    result = {
        "steps_timed": args.steps * args.rounds,
        "probe_every": probe_settings.every,
        "probes_timed": len(timed_rows),
        "probe_set": f"{probe_rows[0]['n_prompts']} prompts x {probe_rows[0]['traces_per_prompt']} traces",
        "dim": probe_rows[0]["dim"],
        "tokens_per_step": tokens,
        "s_per_step_without": elapsed["A"] / (args.steps * args.rounds),
        "s_per_step_with": elapsed["B"] / (args.steps * args.rounds),
        "s_per_probe": probe_seconds / max(1, len(timed_rows)),
        "added_wall_time": elapsed["B"] / elapsed["A"] - 1.0,
        "probe_seconds_over_training": probe_seconds / elapsed["A"],
        "alpha_hat": [round(r["alpha_hat"], 3) for r in probe_rows],
    }
    print("RESULT " + json.dumps(result))
    print(
        f"probe every {result['probe_every']} steps: +{100 * result['added_wall_time']:.1f}% wall time "
        f"(probe alone {100 * result['probe_seconds_over_training']:.1f}% of training; "
        f"{result['s_per_probe']:.2f} s per probe, {result['s_per_step_without']:.2f} s per step)"
    )


if __name__ == "__main__":
    main()
