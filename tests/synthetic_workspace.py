"""A small workspace shaped like a real `bvpo run`, built with the storage API (no vLLM, no Prefect).

Every dataset kind of a run is registered with the parents, stage configs and flow run ids the Prefect
tasks give it (data refresh, training and evaluation as three flow runs), so the catalog, lineage, SQL
views and `bvpo report` see what they would after `make run`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.evaluation.metrics import summarize
from storage import DatasetRef, DatasetStore, schema_for

MODEL = "embedded:smollm2-135m-instruct"
REFRESH_RUN = "3f1c2a9e-0d4b-4c55-9a1e-6b7d8e9f0a11"
TRAIN_RUN = "8a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c22"
EVAL_RUN = "c0ffee00-1234-4abc-8def-0123456789ab"
MODES = ("trace", "empty")


@dataclass(frozen=True)
class SyntheticRun:
    """The registered datasets of one synthetic run."""

    workspace: Path
    datasets: dict[str, DatasetRef]
    flow_runs: tuple[str, str, str] = (REFRESH_RUN, TRAIN_RUN, EVAL_RUN)


def _table(kind: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = schema_for(kind)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _ids(text: str) -> list[int]:
    """Stand-in token ids for synthetic rows (one per character)."""
    return [ord(c) % 251 for c in text]


def _generation(prompt: dict[str, Any], mode: str, i: int, rng: random.Random) -> dict[str, Any]:
    row = _text_generation(prompt, mode, i, rng)
    response = _ids(row["response_text"])
    return row | {
        "prompt_token_ids": _ids(row["prompt_text"]),
        "response_token_ids": response,
        "response_segments": [3] * len(response),
        "eos_emitted": row["finish_reason"] == "stop",
        "sampler_logprobs": [-1.0] * len(response),
    }


def _text_generation(prompt: dict[str, Any], mode: str, i: int, rng: random.Random) -> dict[str, Any]:
    trace_tokens = rng.choice([20, 64, 128]) if mode == "trace" else 0
    budget = trace_tokens == 128
    return {
        "generation_id": f"{prompt['prompt_id']}-{mode}-{i}",
        "prompt_id": prompt["prompt_id"],
        "mode": mode,
        "sample_index": i,
        "model": MODEL,
        "prompt_text": f"<|im_start|>user\n{prompt['prompt']}<|im_end|>\n<|im_start|>assistant\n",
        "response_text": ("<think>\nhmm\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n")
        + f"answer {i}",
        "trace": "hmm" if mode == "trace" else None,
        "answer": f"answer {i}",
        "trace_tokens": trace_tokens,
        "answer_tokens": rng.randint(5, 40),
        "trace_finish_reason": ("budget" if budget else "close_tag") if mode == "trace" else None,
        "finish_reason": rng.choice(["stop", "stop", "length"]),
        "trace_closed": mode == "trace" and not budget,
        "budget_forced": budget,
        "parse_ok": i != 3 or mode == "empty",
        "parse_error": "empty answer" if (i == 3 and mode == "trace") else None,
        "reasoning_control": "prefill",
        "open_tag": "<think>",
        "close_tag": "</think>",
        "prompt_tokens": 30,
        "engine": "vllm",
        "shard_index": 0,
        "seed": 0,
    }


def build_workspace(workspace: Path, num_prompts: int = 16, steps: int = 6) -> SyntheticRun:
    """Register every dataset of one run in ``workspace`` and return their references."""
    rng = random.Random(0)
    config = PipelineConfig.model_validate(
        {"workspace": str(workspace), "prompts": {"num_prompts": num_prompts}, "train": {"max_steps": steps}}
    )
    store = DatasetStore(workspace)
    refs: dict[str, DatasetRef] = {}

    def put(kind: str, rows: list[dict[str, Any]], cfg: dict[str, Any], parents: list[DatasetRef], run: str):
        return store.put(kind, _table(kind, rows), config=cfg, parents=parents, flow_run_id=run)

    prompts = [
        {
            "prompt_id": f"p{i:03d}",
            "prompt": f"What is {i} + {i}?" if i % 2 == 0 else f"Describe the number {i} in three words.",
            "split": "eval" if i % 4 == 3 else "train",
            "task_type": "math" if i % 2 == 0 else "instruction",
            "reference_answer": str(2 * i) if i % 2 == 0 else None,
            "constraints": "[]" if i % 2 == 0 else json.dumps([{"type": "word_count", "max": 3}]),
            "source": "builtin",
            "source_key": f"builtin[{i}]",
        }
        for i in range(num_prompts)
    ]
    refs["prompts"] = put("prompts", prompts, config.prompts.model_dump(mode="json"), [], REFRESH_RUN)
    train = [p for p in prompts if p["split"] == "train"]
    gen_cfg = {"model": MODEL, "generation": config.generation.fingerprint()}
    gens = [_generation(p, mode, i, rng) for p in train for mode in MODES for i in range(4)]
    refs["generations"] = put("generations", gens, gen_cfg, [refs["prompts"]], REFRESH_RUN)

    scores = []
    for g in gens:
        score = 0.0 if not g["parse_ok"] else rng.choice([0.0, 0.5, 1.0])
        scores.append(
            {
                **{k: g[k] for k in ("generation_id", "prompt_id", "mode")},
                "scorer": "verifiable",
                "score": score,
                "checks": json.dumps({"verifiable.correct": score == 1.0}),
                "components": json.dumps({"verifiable": score}),
                "details": None,
            }
        )
    scoring_cfg = config.scoring.model_dump(mode="json")
    refs["scores"] = put("scores", scores, scoring_cfg, [refs["prompts"], refs["generations"]], REFRESH_RUN)

    pairing_cfg = config.pairing.model_dump(mode="json")
    pair_parents = [refs["generations"], refs["scores"]]
    by_key: dict[tuple[str, str], list[tuple[dict[str, Any], float]]] = {}
    for g, s in zip(gens, scores, strict=True):
        if g["parse_ok"]:
            by_key.setdefault((g["prompt_id"], g["mode"]), []).append((g, s["score"]))
    pairs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    rejects = []
    for (prompt_id, mode), candidates in sorted(by_key.items()):
        best = max(candidates, key=lambda c: c[1])
        worst = min(candidates, key=lambda c: c[1])
        if best[1] - worst[1] < config.pairing.min_margin:
            payload = json.dumps({"prompt_id": prompt_id, "mode": mode})
            reason = f"tie: every answer scored {best[1]}"
            rejects.append(
                {"stage": "pair", "row_key": f"{prompt_id}:{mode}", "reason": reason, "payload": payload}
            )
            continue
        pairs[mode].append(
            {
                "pair_id": f"{prompt_id}-{mode}",
                "prompt_id": prompt_id,
                "mode": mode,
                "prompt_text": best[0]["prompt_text"],
                "chosen_response": best[0]["response_text"],
                "rejected_response": worst[0]["response_text"],
                "chosen_answer": best[0]["answer"],
                "rejected_answer": worst[0]["answer"],
                "chosen_score": best[1],
                "rejected_score": worst[1],
                "margin": best[1] - worst[1],
                "chosen_generation_id": best[0]["generation_id"],
                "rejected_generation_id": worst[0]["generation_id"],
                "num_candidates": len(candidates),
                "length_ratio": 1.0,
                "prompt_token_ids": best[0]["prompt_token_ids"],
                "chosen_token_ids": best[0]["response_token_ids"],
                "rejected_token_ids": worst[0]["response_token_ids"],
            }
        )
    if rejects:
        refs["rejects"] = put(
            "rejects", rejects, {"for": "pairs_trace", **pairing_cfg}, pair_parents, REFRESH_RUN
        )
    refs["pairs_trace"] = put("pairs_trace", pairs["trace"], pairing_cfg, pair_parents, REFRESH_RUN)
    refs["pairs_empty"] = put("pairs_empty", pairs["empty"], pairing_cfg, pair_parents, REFRESH_RUN)
    ref_rows = [
        {
            "pair_id": p["pair_id"],
            "mode": p["mode"],
            "ref_model": MODEL,
            "ref_chosen_logp": -20.0 - rng.random(),
            "ref_rejected_logp": -21.0 - rng.random(),
            "chosen_tokens": 40,
            "rejected_tokens": 42,
        }
        for mode in MODES
        for p in pairs[mode]
    ]
    ref_cfg = {"ref_model": MODEL, "max_length": config.train.max_length, "bf16": config.train.bf16}
    refs["ref_logps"] = put(
        "ref_logps", ref_rows, ref_cfg, [refs["pairs_trace"], refs["pairs_empty"]], REFRESH_RUN
    )

    train_cfg = {"model": MODEL, "train": config.train.model_dump(mode="json")}
    checkpoint = workspace / "checkpoints" / "synthetic"
    metrics = [
        {
            "step": s,
            "loss": 0.693 - 0.02 * s,
            "loss_t": 0.70 - 0.025 * s,
            "loss_e": 0.69 - 0.015 * s,
            "alpha": config.train.alpha_value,
            "chosen_reward_t": 0.01 * s,
            "rejected_reward_t": -0.01 * s,
            "reward_margin_t": 0.02 * s,
            "reward_acc_t": min(1.0, 0.5 + 0.1 * s),
            "chosen_reward_e": 0.005 * s,
            "rejected_reward_e": -0.005 * s,
            "reward_margin_e": 0.01 * s,
            "reward_acc_e": min(1.0, 0.5 + 0.05 * s),
            "grad_norm": 1.5 - 0.1 * s,
            "lr": 1e-5,
            "tokens": 1200,
            "tokens_per_s": 180.0,
            "seconds": 6.5,
            "checkpoint": str(checkpoint),
        }
        for s in range(1, steps + 1)
    ]
    train_parents = [refs["pairs_trace"], refs["pairs_empty"], refs["ref_logps"]]
    probes = [
        {
            "step": step,
            "alpha": config.train.alpha_value,
            "alpha_hat": 0.3 + 0.05 * i,
            "ci_low": 0.2 + 0.05 * i,
            "ci_high": 0.45 + 0.05 * i,
            "numerator": 1.0,
            "denominator": 3.0,
            "trace_var_t": 8.0,
            "empty_error": 1.2,
            "ess_posterior": [2.5, 3.1, 1.4, 3.8],
            "ess_min": 1.4,
            "low_ess_prompts": 1,
            "proposal": "stored",
            "bias_t": 0.5,
            "bias_e": 0.9,
            "mse_trace": 8.3,
            "mse_empty": 1.2,
            "mse_alpha": 2.9,
            "n_prompts": 4,
            "traces_per_prompt": 4,
            "dim": 4096,
            "params": "head",
            "seconds": 2.0,
        }
        for i, step in enumerate(range(0, steps, 3))
    ]
    # The train task registers the probe's rows first, with the training's own config and parents.
    refs["grad_stats"] = put("grad_stats", probes, train_cfg, train_parents, TRAIN_RUN)
    refs["train_metrics"] = put("train_metrics", metrics, train_cfg, train_parents, TRAIN_RUN)

    eval_prompts = [p for p in prompts if p["split"] == "eval"]
    eval_rows: list[dict[str, Any]] = []
    for label, parents in (("reference", []), ("trained", [refs["train_metrics"]])):
        rows = []
        for p in eval_prompts:
            for mode in MODES:
                g = _generation(p, mode, 0, rng)
                score = rng.choice([0.0, 1.0]) if label == "reference" else 1.0
                rows.append({**g, "model_label": label, "score": score, "checks": "{}"})
        settings = {
            "label": label,
            "model": MODEL if label == "reference" else str(checkpoint),
            "eval": config.eval.model_dump(mode="json"),
        }
        refs[f"eval_generations_{label}"] = put(
            "eval_generations", rows, settings, [refs["prompts"], *parents], EVAL_RUN
        )
        eval_rows += rows
    results = summarize(eval_rows, reference_label="reference", bootstrap_samples=200, seed=0)
    refs["eval_results"] = put(
        "eval_results",
        results,
        config.eval.model_dump(mode="json"),
        [refs["eval_generations_reference"], refs["eval_generations_trained"]],
        EVAL_RUN,
    )
    return SyntheticRun(workspace=store.workspace, datasets=refs)
