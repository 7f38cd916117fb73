"""Benchmark: the evaluation stage's generation, one engine for every model vs an engine per model.

The default run evaluates four models (the reference, the BVPO checkpoint and the two baselines) on the eval
split of ``configs/default.yaml`` in both modes. Three ways of doing that work, measured one after the other
in this one process tree, each with the stage's own code
(:func:`pipeline.evaluation.stage.generate_eval_rows`: vLLM generation and scoring):

- ``engine per model``: one engine start per model in vLLM's default process layout (engine core and worker
  spawned), as the stage ran before it reloaded weights in place;
- ``one engine``: one start, every further model's weights reloaded in place, same process layout;
- ``one engine, one process``: the stage as it runs now on CPU (``generation.cpu_single_process``).

The four models are copies of the embedded checkpoint in folders of their own (a reload reads every weight
file again, as it would for a trained checkpoint). Greedy decoding, so every way produces the same answers:
the benchmark checks that, so the speed is not bought with other work.

    .venv/bin/python bench/bench_eval.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run(config: Any, prompts: list[dict[str, Any]], targets: list[Any], per_model: bool) -> dict[str, Any]:
    from pipeline.evaluation.stage import generate_eval_rows

    starts: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "engine_ready":
            starts.append(float(event["seconds"]))

    began = time.perf_counter()
    answers: dict[str, list[tuple[str, str, str]]] = {}
    for group in [[t] for t in targets] if per_model else [targets]:
        out = generate_eval_rows(config, prompts, group, on_event=on_event)
        for label, outcome in out.items():
            answers[label] = sorted((r["prompt_id"], r["mode"], r["answer"]) for r in outcome.rows)
    return {"wall_s": time.perf_counter() - began, "starts": starts, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--models", type=int, default=4, help="reference + trained models of the default run")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.evaluation.stage import EvalTarget, eval_prompts
    from pipeline.model_assets import embedded_checkpoint
    from pipeline.prompts.source import load_prompts

    base = load_config(Path(args.config))
    prompts = eval_prompts(load_prompts(base.prompts).rows)
    source = embedded_checkpoint()
    print(f"{len(prompts)} eval prompts x 2 modes x {args.models} models; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        targets = []
        for index in range(args.models):
            folder = Path(tmp) / f"model-{index}"
            shutil.copytree(source, folder)
            targets.append(EvalTarget(f"model-{index}", str(folder), f"bench-model-{index}"))
        ways = [
            ("engine per model", False, True),
            ("one engine", False, False),
            ("one engine, one process", True, False),
        ]
        results = {}
        for name, single, per_model in ways:
            config = base.model_copy(
                update={"generation": base.generation.model_copy(update={"cpu_single_process": single})}
            )
            results[name] = run(config, prompts, targets, per_model)
            r = results[name]
            starts = ", ".join(f"{s:.1f}" for s in r["starts"])
            print(f"{name:26s} {r['wall_s']:7.1f} s wall; engine start(s) {starts} s", flush=True)

    baseline = results["engine per model"]
    for name, r in results.items():
        same = r["answers"] == baseline["answers"]
        print(
            f"{name:26s} {r['wall_s'] / baseline['wall_s']:.2f}x the wall time of an engine per model; "
            f"answers {'identical' if same else 'DIFFERENT'}"
        )
    now = results["one engine, one process"]["wall_s"] / baseline["wall_s"]
    print(f"\nevaluation generation now / engine per model: {now:.2f}x (goal <= 0.5)")
    if any(r["answers"] != baseline["answers"] for r in results.values()):
        sys.exit("the ways produced different answers")


if __name__ == "__main__":
    main()
