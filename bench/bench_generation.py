"""Benchmark: the pipeline's generate stage vs a bare ``vllm.LLM.generate`` script vs batched HF ``generate``.

All three run in this one process tree, one after the other, on the embedded SmolLM2-135M checkpoint with
the same prompts and sampling settings and the same work: for each prompt, n reasoning-on responses (a
trace of at most ``--trace`` tokens stopped at ``</think>``, then an answer of at most ``--answer``
tokens) and n reasoning-off answers. Generated tokens (trace + answer) per second are compared:

- pipeline: :func:`pipeline.generation.stage.run_generate_stage` (child process, vLLM engine, shards);
- bare vLLM: a plain script with two ``LLM.generate`` calls on token-id prompts (in a child process, as
  vLLM requires), doing the same work as the pipeline (ids in, ids and log-probs out), with the pipeline's
  CPU thread binding and vLLM's default process layout (engine core and worker spawned); for information
  once more with vLLM's default binding, and once in the pipeline's one-process layout
  (``generation.cpu_single_process``), the like-for-like comparison of the pipeline's own overhead;
- HF: ``model.generate`` on whole passes at once (left padding, bf16, ``stop_strings``).

    .venv/bin/python bench/bench_generation.py --prompts 32 --samples 4

Engine start is timed the same way for both: from launching the child process to the engine being ready.
Figures are noisy where cores are shared; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OPEN, CLOSE = "<think>", "</think>"


def render(tokenizer: Any, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def bare_vllm(request: dict[str, Any]) -> dict[str, Any]:
    """The bare script: start ``vllm.LLM``, then the two passes with plain ``generate`` calls, in token ids.

    It does the same work as the pipeline: token-id prompts (rendered and tokenized once), the sampled
    trace ids fed back with the forced close tag when the budget stopped a trace or the model ended it with
    EOS (dropped, as ``reasoning.close_on_eos`` does by default), and the log-prob of each sampled token
    returned. Its engine start is timed like the pipeline's: from the process's launch
    (interpreter, ``import vllm``, ``LLM(...)``).
    """
    from vllm import LLM, SamplingParams, TokensPrompt

    layout = {"distributed_executor_backend": "uni"} if request.get("single_process") else {}
    llm = LLM(
        model=request["model"],
        seed=0,
        max_model_len=1024,
        enforce_eager=True,
        dtype=request["dtype"],
        **layout,
    )
    start_s = time.time() - request["launched_at"]
    tokenizer = llm.get_tokenizer()
    n, trace_max, answer_max = request["samples"], request["trace"], request["answer"]
    sampling = {"temperature": request["temperature"], "top_p": request["top_p"], "logprobs": 0}

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    rendered = [ids(render(tokenizer, p)) for p in request["prompts"]]
    open_ids, empty_ids, forced = ids(f"{OPEN}\n"), ids(f"{OPEN}\n\n{CLOSE}\n\n"), ids(f"\n{CLOSE}\n\n")
    first_inputs, first_params = [], []
    for prompt in rendered:
        first_inputs += [
            TokensPrompt(prompt_token_ids=prompt + open_ids),
            TokensPrompt(prompt_token_ids=prompt + empty_ids),
        ]
        first_params += [
            SamplingParams(
                n=n, max_tokens=trace_max, stop=[CLOSE], include_stop_str_in_output=True, **sampling
            ),
            SamplingParams(n=n, max_tokens=answer_max, **sampling),
        ]
    began = time.perf_counter()
    first = llm.generate(first_inputs, first_params, use_tqdm=False)

    def eos_ended(c: Any) -> bool:  # the model sampled EOS inside the trace
        return c.finish_reason == "stop" and c.stop_reason is None and bool(c.token_ids)

    def continued(c: Any) -> list[int]:
        """As the pipeline's default (reasoning.close_on_eos): a trace cut by the budget or ended by EOS
        (that EOS dropped) gets the close tag forced; one closed by the model continues as sampled."""
        if eos_ended(c):
            return list(c.token_ids)[:-1] + forced
        return list(c.token_ids) + (forced if c.finish_reason == "length" else [])

    answer_inputs = [
        TokensPrompt(prompt_token_ids=prompt + open_ids + continued(c))
        for prompt, out in zip(rendered, first[0::2], strict=True)
        for c in out.outputs
    ]
    answers = llm.generate(
        answer_inputs, SamplingParams(n=1, max_tokens=answer_max, **sampling), use_tqdm=False
    )
    gen_s = time.perf_counter() - began
    tokens = sum(len(c.token_ids) for out in [*first, *answers] for c in out.outputs)
    return {"start_s": start_s, "gen_s": gen_s, "tokens": tokens}


def run_bare(request: dict[str, Any], env: dict[str, str], single_process: bool = False) -> dict[str, Any]:
    """The bare script in a child process; ``single_process``: engine core and worker in that process, as
    the pipeline runs a one-rank CPU engine (``generation.cpu_single_process``)."""
    if single_process:
        env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps({**request, "launched_at": time.time(), "single_process": single_process}))
        out = Path(tmp) / "result.json"
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--bare", str(path), "--bare-out", str(out)],
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "2", **env},
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - started}


def run_pipeline(model: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import GenerationConfig
    from pipeline.generation.stage import run_generate_stage

    config = GenerationConfig(
        samples_per_prompt=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_trace_tokens=args.trace,
        max_answer_tokens=args.answer,
        shard_size=args.shard_size or len(prompts),
        dtype=args.dtype,
    )
    rows = [{"prompt_id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(quiet.fileno(), 2)  # vLLM's progress bars
        try:
            result = run_generate_stage(model, rows, config, model_label="bench", staging_dir=Path(tmp))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tokens = sum(r["trace_tokens"] + r["answer_tokens"] for r in result.rows)
    ready = next((e for e in result.events if e.get("event") == "engine_ready"), {})
    print(f"pipeline engine start phases: {ready.get('phases')}")
    return {
        "start_s": result.engine_start_seconds or 0.0,
        "gen_s": result.generation_seconds,
        "wall_s": result.wall_seconds,
        "tokens": tokens,
    }


def hf_count(rows: Any, stop_ids: set[int]) -> list[int]:
    """Generated tokens per row: up to and including the first end/pad token."""
    counts = []
    for row in rows.tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        counts.append(len(row) if end is None else end + 1)
    return counts


def run_hf(model_path: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval()
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}

    def generate(texts: list[str], n: int, max_new: int, stop: list[str] | None) -> tuple[list[str], int]:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=max_new,
                num_return_sequences=n,
                pad_token_id=tokenizer.pad_token_id,
                stop_strings=stop,
                tokenizer=tokenizer if stop else None,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        counts = hf_count(new, stop_ids)
        texts_out = [
            tokenizer.decode(row[:c], skip_special_tokens=True) for row, c in zip(new, counts, strict=True)
        ]
        return texts_out, sum(counts)

    rendered = [render(tokenizer, p) for p in prompts]
    began = time.perf_counter()
    traces, t1 = generate([f"{r}{OPEN}\n" for r in rendered], args.samples, args.trace, [CLOSE])
    _, t2 = generate([f"{r}{OPEN}\n\n{CLOSE}\n\n" for r in rendered], args.samples, args.answer, None)
    answer_inputs = [
        f"{r}{OPEN}\n{trace.removesuffix(CLOSE).strip()}\n{CLOSE}\n\n"
        for i, r in enumerate(rendered)
        for trace in traces[i * args.samples : (i + 1) * args.samples]
    ]
    _, t3 = generate(answer_inputs, 1, args.answer, None)
    return {"start_s": 0.0, "gen_s": time.perf_counter() - began, "tokens": t1 + t2 + t3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--trace", type=int, default=128)
    parser.add_argument("--answer", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="vLLM dtype")
    parser.add_argument("--skip-hf", action="store_true", help="skip batched HF generate (slow on CPUs)")
    parser.add_argument("--shard-size", type=int, default=0, help="0: one shard")
    parser.add_argument("--skip-default-bind", action="store_true", help="skip bare vLLM with vLLM's binding")
    parser.add_argument(
        "--skip-single-process",
        action="store_true",
        help="skip bare vLLM in the pipeline's one-process layout",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="pipeline/bare pairs, interleaved (P B, B P, ...): the ratio's median and range over pairs",
    )
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--bare-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        result = bare_vllm(json.loads(Path(args.bare).read_text()))
        Path(args.bare_out).write_text(json.dumps(result))
        return

    from pipeline.generation.engine import cpu_thread_env
    from pipeline.model_assets import embedded_checkpoint
    from pipeline.prompts.builtin import build_builtin_prompts

    model = str(embedded_checkpoint())
    prompts = [r.prompt for r in build_builtin_prompts(args.prompts, seed=0)]
    request = {
        "model": model,
        "prompts": prompts,
        "samples": args.samples,
        "trace": args.trace,
        "answer": args.answer,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "dtype": args.dtype,
    }
    print(
        f"{len(prompts)} prompts x 2 modes x n={args.samples}; trace <= {args.trace}, "
        f"answer <= {args.answer} tokens; {os.cpu_count()} CPUs"
    )
    subprocess.run([sys.executable, "-c", "import vllm"], check=True, capture_output=True)  # warm file cache
    pairs = []
    for index in range(args.repeats):  # alternate the order: neither side always runs on a warmer machine
        if index % 2 == 0:
            pipe = run_pipeline(model, prompts, args)
            bare = run_bare(request, cpu_thread_env("all", 1))
        else:
            bare = run_bare(request, cpu_thread_env("all", 1))
            pipe = run_pipeline(model, prompts, args)
        pairs.append((pipe, bare))
        print(f"pair {index + 1}: pipeline {speed(pipe):.1f} tok/s, bare {speed(bare):.1f} tok/s", flush=True)
    default = None if args.skip_default_bind else run_bare(request, {})
    single = None if args.skip_single_process else run_bare(request, cpu_thread_env("all", 1), True)
    hf = None if args.skip_hf else run_hf(model, prompts, args)

    rows = [("pipeline generate stage", pipe), ("bare vllm.LLM.generate", bare)]
    rows += [("bare vllm, vLLM's default binding", default)] if default else []
    rows += [("bare vllm, one process (pipeline's)", single)] if single else []
    rows += [("HF generate, batched", hf)] if hf else []
    header = ("tokens", "start s", "gen s", "tok/s", "wall s", "tok/s of wall")
    print(f"\n{'':36s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header, (7, 8, 7, 7, 7, 14), strict=True)))
    for name, f in rows:
        total = f.get("wall_s", f["start_s"] + f["gen_s"])
        print(
            f"{name:36s} {f['tokens']:7d} {f['start_s']:8.1f} {f['gen_s']:7.1f} "
            f"{speed(f):7.1f} {total:7.1f} {f['tokens'] / total:14.1f}"
        )
    if len(pairs) > 1:
        ratios = sorted(speed(p) / speed(b) for p, b in pairs)
        starts = sorted(p["start_s"] - b["start_s"] for p, b in pairs)
        print(
            f"\nover {len(pairs)} interleaved pairs: pipeline / bare tokens/s median "
            f"{statistics.median(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}); engine start "
            f"difference median {statistics.median(starts):+.1f} s "
            f"(range {starts[0]:+.1f} to {starts[-1]:+.1f})"
        )
        print("the table and the lines below are the last pair")
    with_start = (pipe["tokens"] / pipe["wall_s"]) / (bare["tokens"] / bare["wall_s"])
    print(f"\npipeline / bare vLLM, generation:            {speed(pipe) / speed(bare):.2f}x (goal >= 0.95)")
    print(
        f"pipeline - bare vLLM, engine start:          {pipe['start_s'] - bare['start_s']:+.1f} s (goal <= 5)"
    )
    print(f"pipeline / bare vLLM, wall (process, engine start): {with_start:.2f}x")
    if hf:
        print(f"pipeline / batched HF generate:              {speed(pipe) / speed(hf):.2f}x (goal >= 5)")
    if default:
        print(f"bare vLLM, pipeline binding / vLLM default:  {speed(bare) / speed(default):.2f}x")
    if single:
        print(
            f"pipeline / bare vLLM in one process:         {speed(pipe) / speed(single):.2f}x tokens/s, "
            f"engine start {pipe['start_s'] - single['start_s']:+.1f} s (like for like in process layout)"
        )


def speed(figures: dict[str, Any]) -> float:
    return float(figures["tokens"] / figures["gen_s"])


if __name__ == "__main__":
    main()
