"""Interop commands: `bvpo import pairs` (bring-your-own preference pairs) and `bvpo export pairs` (TRL)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.app import ConfigOpt, DebugOpt, SetOpt, app, console, fail, pipeline_config
from flows.cli.data import export_app

import_app = typer.Typer(
    help="Import data made elsewhere: preference pairs.\n\nExample:\n\n  bvpo import pairs my-pairs.jsonl",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")

WorkspaceOverride = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Workspace (default: the config's workspace).")
]


class PairMode(StrEnum):
    trace = "trace"
    empty = "empty"


class PairFileFormat(StrEnum):
    parquet = "parquet"
    jsonl = "jsonl"
    hf = "hf"


class PairLayout(StrEnum):
    conversational = "conversational"
    standard = "standard"


def _config(config: Path | None, overrides: list[str] | None, workspace: Path | None) -> Any:
    cfg = pipeline_config(config, overrides)
    return cfg if workspace is None else cfg.model_copy(update={"workspace": workspace})


@import_app.command("pairs")
def import_pairs_command(
    source: Annotated[
        str | None,
        typer.Argument(help="A .parquet / .jsonl file, a save_to_disk folder or hf:ID[:SPLIT]."),
    ] = None,
    mode: Annotated[
        PairMode | None, typer.Option(help="Every row of SOURCE is of this mode (else: a mode column).")
    ] = None,
    trace_source: Annotated[str | None, typer.Option(help="A source of D_t (reasoning-on) pairs.")] = None,
    empty_source: Annotated[str | None, typer.Option(help="A source of D_e (reasoning-off) pairs.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workspace: WorkspaceOverride = None,
    debug: DebugOpt = False,
) -> None:
    """Import preference pairs as pairs_trace (D_t) and pairs_empty (D_e), validated row by row.

    Rows: prompt / chosen / rejected as strings or chat messages, reasoning inline in think tags or in
    reasoning_content. Bad rows go to rejects with a reason; on an error nothing is registered. Without
    SOURCE or --trace-source/--empty-source, the config's pairs.* sources are used.

    Examples:
      bvpo import pairs my-pairs.jsonl                         # one source with a mode column
      bvpo import pairs --trace-source dt.parquet --empty-source de.parquet
      bvpo import pairs out/pairs_trace --mode trace -c configs/tiny.yaml
    """
    from pipeline.interop.catalog_pairs import configured_sources, import_pairs
    from pipeline.interop.import_pairs import PairSource
    from storage import DatasetStore

    try:
        cfg = _config(config, overrides, workspace)
        given = [(source, mode.value if mode else None), (trace_source, "trace"), (empty_source, "empty")]
        sources = [PairSource(loc, m) for loc, m in given if loc] or configured_sources(cfg)  # type: ignore[arg-type]
        store = DatasetStore(cfg.workspace)
        refs, result = import_pairs(store, cfg, sources)
        for mode_name, ref in refs.items():
            console.print(f"{ref.name}: {ref.row_count} {mode_name} pairs", markup=False)
        if result.rejects:
            console.print(
                f"{len(result.rejects)} row(s) rejected: bvpo sql -w {cfg.workspace} "
                "\"select row_key, reason from rejects where stage = 'import_pairs'\"",
                markup=False,
            )
        console.print(
            f"imported from {', '.join(s.label for s in sources)} (not sampled here); train on them with "
            f"`bvpo run --set pairs.source=...` or the pairs.* config",
            markup=False,
        )
    except Exception as exc:
        fail(exc, debug)


@export_app.command("pairs")
def export_pairs_command(
    run: Annotated[
        str,
        typer.Argument(help="latest, a pairs dataset, or any dataset of a run (train_metrics__v2, …)."),
    ] = "latest",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write into.")] = Path("pairs"),
    file_format: Annotated[
        PairFileFormat, typer.Option("--format", "-f", help="parquet, jsonl or hf (save_to_disk folder).")
    ] = PairFileFormat.parquet,
    layout: Annotated[
        PairLayout, typer.Option(help="conversational (chat messages) or standard (rendered strings).")
    ] = PairLayout.conversational,
    token_ids: Annotated[
        bool, typer.Option(help="Add the exact token ids (prompt/chosen/rejected_token_ids) as columns.")
    ] = True,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    workspace: WorkspaceOverride = None,
    debug: DebugOpt = False,
) -> None:
    """Export D_t and D_e in TRL's preference format (prompt / chosen / rejected), one file per mode.

    D_t keeps the reasoning inline in think tags, D_e carries an empty think block. Train each with TRL's
    DPOTrainer: load_dataset("parquet", data_files="pairs/pairs_trace.parquet", split="train").

    Examples:
      bvpo export pairs -o pairs/                              # the latest D_t and D_e, Parquet
      bvpo export pairs train_metrics__v2 -f jsonl -o out/     # the pairs a run trained on
      bvpo export pairs -f hf --layout standard -o out/
    """
    from pipeline.generation.reasoning import TraceFormat
    from pipeline.interop.catalog_pairs import load_tokenizer, prompt_texts, run_pairs
    from pipeline.interop.chat_prompt import template_frame, user_message
    from pipeline.interop.export_pairs import export_pairs
    from storage import DatasetStore

    try:
        cfg = _config(config, overrides, workspace)
        store = DatasetStore(cfg.workspace)
        refs = run_pairs(store, run)
        fmt = TraceFormat(cfg.generation.reasoning)
        prompts = prompt_texts(store, list(refs.values()))
        frames: dict[str, tuple[str, str]] = {}

        def user_of(pair: dict[str, Any]) -> str:
            if pair["prompt_id"] in prompts:
                return prompts[pair["prompt_id"]]
            if pair["mode"] not in frames:  # imported pairs: read the user message out of the rendered prompt
                frames[pair["mode"]] = template_frame(load_tokenizer(cfg), fmt, pair["mode"])
            found = user_message(pair["prompt_text"], frames[pair["mode"]])
            if found is None:
                raise ValueError(
                    f"pair '{pair['pair_id']}': its prompt was not rendered by {cfg.model.name_or_path}'s "
                    "chat template; export it with --layout standard"
                )
            return found

        written = export_pairs(
            {mode: (ref.name, store.read_rows(ref)) for mode, ref in refs.items()},
            output,
            fmt,
            layout=layout.value,  # type: ignore[arg-type]
            file_format=file_format.value,  # type: ignore[arg-type]
            user_message=user_of if layout is PairLayout.conversational else None,
            token_ids=token_ids,
        )
        for item in written:
            console.print(
                f"wrote {item.path} ({item.rows} {item.mode} pairs of {item.dataset})", markup=False
            )
    except Exception as exc:
        fail(exc, debug)
