"""pipeline/isolation.py: a stage function in a spawned child process, its result, errors and callbacks."""

from __future__ import annotations

import os

import pytest

from pipeline.isolation import IsolatedStageError, run_isolated


class StageFailure(ValueError):
    pass


@pytest.fixture(autouse=True)
def _isolation_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BVPO_ISOLATE_STAGES", "1")  # tests/conftest.py turns it off for other tests


def _add(a: int, b: int, *, scale: int = 1) -> dict[str, int]:
    return {"sum": (a + b) * scale, "pid": os.getpid()}


def _fail(message: str) -> None:
    raise StageFailure(message)


def _die() -> None:
    os._exit(3)


def _progress(steps: int, on_step: object = None) -> int:
    for i in range(steps):
        on_step({"step": i + 1})  # type: ignore[operator]
    return steps


def _nested() -> int:
    return run_isolated(_add, 1, 1)["pid"]


def test_result_comes_back_from_another_process() -> None:
    out = run_isolated(_add, 2, 3, scale=10)
    assert out["sum"] == 50
    assert out["pid"] != os.getpid()


def test_exception_keeps_its_type_and_the_child_traceback() -> None:
    with pytest.raises(StageFailure, match="bad rows") as info:
        run_isolated(_fail, "bad rows")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "child process" in notes and "in _fail" in notes


def test_a_child_that_dies_is_an_error() -> None:
    with pytest.raises(IsolatedStageError, match="exit code 3"):
        run_isolated(_die)


def test_callbacks_run_in_the_caller() -> None:
    seen: list[dict[str, int]] = []
    assert run_isolated(_progress, 3, callbacks={"on_step": seen.append}) == 3
    assert seen == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_a_raising_callback_ends_the_child() -> None:
    def stop(row: dict[str, int]) -> None:
        raise RuntimeError(f"stop at {row['step']}")

    with pytest.raises(RuntimeError, match="stop at 1"):
        run_isolated(_progress, 1000, callbacks={"on_step": stop})


def test_nested_calls_run_in_the_child_itself() -> None:
    pid = run_isolated(_nested)
    assert pid != os.getpid()


def test_turned_off_runs_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BVPO_ISOLATE_STAGES", "0")
    assert run_isolated(_add, 1, 2)["pid"] == os.getpid()
