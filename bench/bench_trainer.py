"""Benchmark: BVPO trainer vs TRL's DPOTrainer on the same pairs, batch and sequence lengths.

Both run on the embedded SmolLM2-135M checkpoint with precomputed reference log-probs, counting the same
number of sequences per optimizer step (TRL: B pairs = 2B sequences; BVPO with α = 0.5: B/2 pairs from
D_t and B/2 from D_e = 2B sequences, the same texts in both modes). Each side runs in its own process so
peak RSS is its own. Needs the bench extra (``pip install -e .[bench]`` for trl).

tokens/s counts the same thing on both sides: the tokens of the 2B sequences prompt + response (BVPO runs
each prompt once for its two responses and pads nothing, so it runs fewer positions than it counts). MFU is
each side's model FLOPs (6·N per position run plus the attention term, pipeline/training/mfu.py) per second
over this machine's measured matmul peak in the precision used. Tokens per CPU-second (process CPU time,
all threads) is printed next to wall-clock tokens/s: on a machine shared with other work it moves much less.

    .venv/bin/python bench/bench_trainer.py --steps 6 --pairs-per-step 4 [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

SENTENCE = (
    "the river carries light across the valley while small boats drift past old stone bridges and the "
    "morning air smells of rain"
)
WORDS = SENTENCE.split(" ")


def make_pairs(tokenizer: Any, count: int, response_tokens: int) -> list[dict[str, Any]]:
    """Synthetic chat pairs whose responses are about ``response_tokens`` tokens long."""
    from pipeline.prompts.builtin import build_builtin_prompts

    pairs = []
    for i, prompt in enumerate(build_builtin_prompts(count, seed=7)):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.prompt}], tokenize=False, add_generation_prompt=True
        )

        def response(offset: int) -> str:
            words = [WORDS[(offset + k) % len(WORDS)] for k in range(response_tokens)]
            return " ".join(words)

        pairs.append(
            {
                "pair_id": f"p{i}",
                "prompt_text": text,
                "chosen_response": response(i),
                "rejected_response": response(i + 5),
            }
        )
    return pairs


def _tokenized(tokenizer: Any, pair: dict[str, Any]) -> Any:
    """Prompt and responses tokenized apart (responses end with EOS), as the training data is."""
    try:
        from pipeline.training.encoding import TokenizedPair
    except ImportError:
        from pipeline.training.sequences import TokenizedPair  # type: ignore[no-redef]

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    eos = [tokenizer.eos_token_id]
    chosen, rejected = ids(pair["chosen_response"]) + eos, ids(pair["rejected_response"]) + eos
    return TokenizedPair(pair["pair_id"], ids(pair["prompt_text"]), chosen, rejected, False)


def run_bvpo(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.config import TrainConfig
    from pipeline.model_assets import embedded_checkpoint
    from pipeline.training.modeling import load_model_and_tokenizer
    from pipeline.training.trainer import BVPOTrainer, RefPair

    model, tokenizer = load_model_and_tokenizer(str(embedded_checkpoint()), False)
    pairs = make_pairs(tokenizer, args.num_pairs, args.response_tokens)
    data = [RefPair(_tokenized(tokenizer, p), -100.0, -100.0) for p in pairs]
    config = TrainConfig(
        alpha=0.5,
        batch_size=args.pairs_per_step // 2,
        max_steps=args.steps + 1,
        bf16=args.bf16,
        learning_rate=1e-6,
        checkpoint_every=0,
        warmup_steps=0,
    )
    torch.manual_seed(0)
    trainer = BVPOTrainer(model, data, data, config, pad_id=tokenizer.pad_token_id)
    trainer.train_step()  # warm-up, not timed (it also measures the matmul peak for the MFU)
    start, cpu_start = time.perf_counter(), time.process_time()
    rows = [trainer.train_step() for _ in range(args.steps)]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(r["tokens"] for r in rows)
    return {
        "impl": "bvpo",
        "s_per_step": elapsed / args.steps,
        "cpu_s_per_step": cpu / args.steps,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
        "positions_per_s": sum(r["forward_tokens"] for r in rows) / elapsed,
        "mfu": sum(r["mfu"] * r["seconds"] for r in rows) / sum(r["seconds"] for r in rows),
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.model_assets import embedded_checkpoint
    from pipeline.training.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(embedded_checkpoint()), False)
    pairs = make_pairs(tokenizer, args.num_pairs, args.response_tokens)
    dataset = Dataset.from_list(
        [
            {"prompt": p["prompt_text"], "chosen": p["chosen_response"], "rejected": p["rejected_response"]}
            for p in pairs
        ]
    )
    marks: list[float] = []
    cpu_marks: list[float] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.pairs_per_step,
            max_steps=args.steps + 1,
            learning_rate=1e-6,
            precompute_ref_log_probs=True,
            bf16=args.bf16,
            report_to=[],
            logging_steps=1000,
            save_strategy="no",
            dataloader_num_workers=0,
            use_cpu=True,
            max_length=1024,
        )
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(Timer())
        trainer.train()
    from pipeline.training.mfu import flop_model, training_peak

    steps = len(marks) - 1
    elapsed, cpu = marks[-1] - marks[0], cpu_marks[-1] - cpu_marks[0]
    lengths = [
        len(tokenizer(p["prompt_text"] + r)["input_ids"])
        for p in pairs
        for r in (p["chosen_response"], p["rejected_response"])
    ]
    per_pair = sum(lengths) / len(pairs)  # TRL draws pairs in its own order: the mean pair
    keys_per_pair = sum(n * (n + 1) // 2 for n in lengths) / len(pairs)
    tokens = per_pair * args.pairs_per_step * steps
    flops = flop_model(model).step_flops(int(tokens), int(keys_per_pair * args.pairs_per_step * steps))
    return {
        "impl": "trl",
        "s_per_step": elapsed / steps,
        "cpu_s_per_step": cpu / steps,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
        "positions_per_s": tokens / elapsed,  # unpadded positions (TRL also runs its padding)
        "mfu": flops / elapsed / training_peak(model, args.bf16),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--num-pairs", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=100)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--impl", choices=["bvpo", "trl"])
    args = parser.parse_args()
    if args.impl:
        result = run_bvpo(args) if args.impl == "bvpo" else run_trl(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for impl in ("trl", "bvpo"):
        command = [sys.executable, __file__, "--impl", impl, *sys.argv[1:]]
        proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{impl} failed:\n{proc.stderr[-3000:]}")
        results[impl] = json.loads(line[7:])
        print(f"{impl:5s} {results[impl]}")
    trl, ours = results["trl"], results["bvpo"]
    print(
        f"{'bf16' if args.bf16 else 'fp32'}: BVPO/TRL steps/s x{trl['s_per_step'] / ours['s_per_step']:.2f}, "
        f"tokens/s x{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}, "
        f"tokens per CPU-second x{ours['tokens_per_cpu_s'] / trl['tokens_per_cpu_s']:.2f}, "
        f"peak RSS {ours['peak_rss_mb']:.0f} MB vs {trl['peak_rss_mb']:.0f} MB, "
        f"MFU {ours['mfu']:.1%} vs {trl['mfu']:.1%}"
    )


if __name__ == "__main__":
    main()
