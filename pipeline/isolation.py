"""Run one accelerator-heavy stage in a spawned child process, so its memory is handed back when it ends.

A model loaded in the flow's own process keeps its host RAM (and, on GPUs, the CUDA caching allocator's
blocks and the CUDA context) until the process exits: the next stage's vLLM engine then finds the
accelerator partly taken. :func:`run_isolated` calls a picklable top-level function in a fresh
interpreter (``spawn``: no inherited CUDA state), returns its result, and re-raises its exception with
the child's traceback attached. Callbacks (progress lines) cross the boundary as messages. See
``docs/method.md`` §Pipeline stages.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")

# Set in a child started by run_isolated: nested calls run in place (the child is already isolated).
_CHILD_ENV = "BVPO_ISOLATED_CHILD"
# "0" runs every stage in the calling process (debugging with breakpoints); anything else isolates.
DISABLE_ENV = "BVPO_ISOLATE_STAGES"


class IsolatedStageError(RuntimeError):
    """The child failed in a way that cannot be re-raised as its own exception (it died, or the exception
    could not be pickled)."""


class _Callback:
    """Stands in for a callback inside the child: each call becomes an ``event`` message to the parent."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name

    def __call__(self, *args: Any) -> None:
        self.conn.send(("event", self.name, args))


def run_isolated(
    fn: Callable[..., T],
    *args: Any,
    callbacks: dict[str, Callable[..., Any] | None] | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)`` in a spawned child process; its return value (pickled back).

    ``callbacks``: keyword arguments of ``fn`` that are callables of the caller (a Prefect logger's
    closure cannot be pickled): in the child each becomes a stub that sends its arguments here, where the
    real callable runs, in this thread. If a callback raises, the child is ended and the error propagates.
    """
    if os.environ.get(_CHILD_ENV) == "1" or os.environ.get(DISABLE_ENV) == "0":
        return fn(*args, **{**kwargs, **(callbacks or {})})
    handlers = {name: cb for name, cb in (callbacks or {}).items() if cb is not None}
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child_main,
        args=(sender, fn, args, kwargs, sorted(handlers)),
        name=f"bvpo-isolated-{getattr(fn, '__name__', 'stage')}",
    )
    child.start()
    sender.close()  # the child holds the only write end: EOF here means it is gone
    try:
        while True:
            try:
                message = receiver.recv()
            except EOFError:
                child.join()
                raise IsolatedStageError(
                    f"{_describe(fn)} died in its child process (exit code {child.exitcode}) "
                    f"without a result (killed for memory?)"
                ) from None
            kind = message[0]
            if kind == "event":
                handlers[message[1]](*message[2])
            elif kind == "result":
                child.join()
                return message[1]  # type: ignore[no-any-return]
            else:
                _, exc_bytes, text = message
                child.join()
                _raise_child_error(fn, exc_bytes, text)
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
            child.join()


def _describe(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _raise_child_error(fn: Callable[..., Any], exc_bytes: bytes | None, text: str) -> None:
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            exc = pickle.loads(exc_bytes)
        except Exception:
            exc = None
    if exc is None:
        raise IsolatedStageError(f"{_describe(fn)} failed in its child process:\n{text}")
    exc.add_note(f"raised in the child process of {_describe(fn)}:\n{text}")
    raise exc


def _child_main(
    conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]
) -> None:
    os.environ[_CHILD_ENV] = "1"
    try:
        for name in names:
            kwargs[name] = _Callback(conn, name)
        result = fn(*args, **kwargs)
    except BaseException as exc:
        text = traceback.format_exc()
        try:
            exc_bytes: bytes | None = pickle.dumps(exc)
            pickle.loads(exc_bytes)  # some exceptions pickle but do not unpickle (required arguments)
        except Exception:
            exc_bytes = None
        conn.send(("error", exc_bytes, text))
    else:
        conn.send(("result", result))
    finally:
        conn.close()


def isolated(fn: Callable[..., T], *, callbacks: tuple[str, ...] = ()) -> Callable[..., T]:
    """``fn`` as a callable that runs through :func:`run_isolated`; the ``callbacks`` keywords stay here."""

    def call(*args: Any, **kwargs: Any) -> T:
        handlers = {name: kwargs.pop(name) for name in callbacks if name in kwargs}
        return run_isolated(fn, *args, callbacks=handlers, **kwargs)

    call.__name__ = getattr(fn, "__name__", "isolated")
    return call
