"""`bvpo study`: an α study on shared data (flows/study.py), then its table and report path."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.app import (
    ConfigOpt,
    DebugOpt,
    SetOpt,
    app,
    console,
    fail,
    pipeline_config,
    prepare_flow_process,
    print_rows,
)

_COLUMNS = ("alpha", "mode", "seeds", "n", "score", "diff_ref", "diff_best", "seed_sd", "mde_ref")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def study(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    alphas: Annotated[
        str, typer.Option(help="α grid, comma-separated numbers in [0, 1] and/or 'auto'.")
    ] = "0,0.25,0.5,0.75,1,auto",
    seeds: Annotated[str, typer.Option(help="Training seeds of every α, comma-separated.")] = "0,1",
    eval_prompts: Annotated[
        int | None,
        typer.Option(help="Eval prompts to build (built-in prompts). Default: sized from --target-mde."),
    ] = None,
    target_mde: Annotated[
        float, typer.Option(help="Score difference the eval set should resolve (95% level, 80% power).")
    ] = 0.1,
    planning_sd: Annotated[
        float, typer.Option(help="SD of per-prompt score differences assumed when sizing the eval set.")
    ] = 0.5,
    debug: DebugOpt = False,
) -> None:
    """An α study: arms over an α grid × seeds on shared data, evaluated together, with paired intervals.

    One data refresh and reference pass for every arm; the reference and every arm evaluated on the same
    prompts through one engine; the report gives paired intervals and the minimum detectable difference.

    Examples:
      bvpo study --config configs/tiny.yaml --alphas 0,1 --seeds 0,1
      bvpo study --alphas 0,0.5,1,auto --seeds 0,1,2 --eval-prompts 200
    """
    try:
        cfg = pipeline_config(config, set_)
        seed_list = [int(s) for s in _split(seeds)]
        alpha_list = _split(alphas)
    except Exception as exc:
        fail(exc, debug)
        return
    prepare_flow_process()
    from flows.study import study as study_flow
    from storage import DatasetStore

    try:
        out = study_flow(
            cfg,
            alphas=alpha_list,
            seeds=seed_list,
            eval_prompts=eval_prompts,
            target_mde=target_mde,
            planning_sd=planning_sd,
        )
        rows = DatasetStore(cfg.workspace).read_rows(out.study_results)
    except Exception as exc:
        fail(exc, debug)
        return

    def cell(value: object) -> object:
        return round(value, 3) if isinstance(value, float) else value

    print_rows(list(_COLUMNS), [tuple(cell(r.get(c)) for c in _COLUMNS) for r in rows])
    console.print(f"Study results: {out.study_results.name}", markup=False, highlight=False)
    console.print(f"Report:        {out.report}", markup=False, highlight=False)
