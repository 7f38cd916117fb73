"""Every GPU config (configs/gpu-*.yaml, configs/multinode.yaml, configs/paper-*.yaml) loads, validates and
runs its plumbing end to end on CPU: the stages from prompts to evaluation, with the embedded model swapped
in (``model.name_or_path=embedded``) and tiny sizes.

What cannot run here is swapped too, and only that: hub datasets (a local prompt file), the reward model
(the verifiable scorer), the served and judge endpoints (the in-process engine, no judge), several
processes or nodes (one), and vLLM itself (the scripted engine of tests/reliability_helpers.py, which
speaks the embedded model's own tokenizer). Reasoning control is 'prefill': SmolLM2's template takes no
enable_thinking. Everything else (LoRA, gradient checkpointing, dtypes, pairing, lengths) is the config's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tasks.stages as stages
from pipeline.config import load_config
from tests.reliability_helpers import install_fake_child_process, quiet_prefect, write_prompt_file

ROOT = Path(__file__).resolve().parents[1]
_DIR = ROOT / "configs"
CONFIGS = sorted([*_DIR.glob("gpu-*.yaml"), _DIR / "multinode.yaml", *_DIR.glob("paper-*.yaml")])

SMALL = [
    "model.name_or_path=embedded",
    "prompts.num_prompts=1000",
    "prompts.eval_fraction=0.3",
    "generation.engine=vllm",
    "generation.reasoning.control=prefill",
    "generation.samples_per_prompt=4",
    "generation.max_trace_tokens=16",
    "generation.max_answer_tokens=24",
    "generation.max_model_len=512",
    "generation.shard_size=4",
    "generation.tensor_parallel_size=1",
    "scoring.scorers=[verifiable]",
    "pairing.min_margin=0.1",
    "train.max_steps=1",
    "train.batch_size=1",
    "train.grad_accum_steps=1",
    "train.max_length=512",
    "train.num_processes=1",
    "train.num_nodes=1",
    "train.warmup_steps=0",
    "train.checkpoint_every=1",
    "eval.pairwise_judge=null",
    "eval.samples_per_prompt=1",
    "eval.bootstrap_samples=20",
]


def _run_all(config: Any) -> dict[str, Any]:
    done: dict[str, Any] = {"prompts": stages.prompts_task.fn(config)}
    done["generations"] = stages.generate_task.fn(config, done["prompts"])
    done["scores"] = stages.score_task.fn(config, done["prompts"], done["generations"])
    pairs = stages.pair_task.fn(config, done["generations"], done["scores"])
    done["pairs_trace"], done["pairs_empty"] = pairs
    done["ref_logps"] = stages.reference_logps_task.fn(config, done["pairs_trace"], done["pairs_empty"])
    trained = stages.train_task.fn(config, done["pairs_trace"], done["pairs_empty"], done["ref_logps"])
    done["checkpoint"] = trained.checkpoint
    done["eval_results"] = stages.evaluate_task.fn(
        config, done["prompts"], trained.checkpoint, trained.metrics
    )
    return done


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_every_gpu_config_runs_its_plumbing_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(CONFIGS) >= 3, CONFIGS
    install_fake_child_process(monkeypatch)
    source = write_prompt_file(tmp_path / "prompts.jsonl", count=12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path in CONFIGS:
            full = load_config(path)  # as written: it validates
            assert full.model.name_or_path != "embedded"
            workspace = tmp_path / path.stem
            config = load_config(path, [*SMALL, f"workspace={workspace}", f"prompts.source={source}"])
            with quiet_prefect():
                done = _run_all(config)
            checkpoint = Path(done["checkpoint"])
            assert (checkpoint / "config.json").is_file(), path.name
            if full.train.lora is not None:
                assert (checkpoint / "adapter" / "adapter_config.json").is_file(), path.name
            assert done["eval_results"].row_count > 0, path.name
    finally:
        torch.set_num_threads(threads)
