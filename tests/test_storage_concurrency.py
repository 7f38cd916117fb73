"""Concurrent writers, readers beside writers, SIGKILLed writers, and stale staging cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

import storage.catalog as catalog_module
import storage.parquet_io as pio
import storage.query as query_module
from storage import CatalogError, DatasetStore, QueryError, run_readonly_query
from storage.locks import file_lock

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys, time
from pathlib import Path
import pyarrow as pa
from storage import DatasetStore

workspace, tag, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
table = pa.table({"stage": ["s"] * 3, "row_key": ["a", "b", "c"], "reason": [tag] * 3, "payload": ["{}"] * 3})
store = DatasetStore(workspace)
(go.parent / f"ready-{tag}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(count):
    store.put("rejects", table, config={"writer": tag, "i": i}, parents=[])
"""

# Writes a 20,000-row dataset in 10 parts and stops forever at a chosen point, to be SIGKILLed there.
CRASHER = """
import os, sys, time
from pathlib import Path
import pyarrow as pa
import storage.catalog as catalog
import storage.parquet_io as pio
from storage import DatasetStore, LakeFS

workspace, point, flag = sys.argv[1], sys.argv[2], Path(sys.argv[3])
pio.ROWS_PER_PART = 2000

def stop_here():
    flag.write_text(str(os.getpid()))
    time.sleep(120)

if point == "parts":  # after 3 of the 10 parts are written to the staging folder
    write_table, written = pio.pq.write_table, []
    def slow_write(*args, **kwargs):
        write_table(*args, **kwargs)
        written.append(1)
        if len(written) == 3:
            stop_here()
    pio.pq.write_table = slow_write
elif point == "published":  # renamed into place, not registered yet
    publish = LakeFS.publish
    def slow_publish(self, *args):
        publish(self, *args)
        stop_here()
    LakeFS.publish = slow_publish
elif point == "transaction":  # inside the registration transaction, after its INSERT, before COMMIT
    glob = catalog.dataset_glob
    def slow_glob(path):
        stop_here()
        return glob(path)
    catalog.dataset_glob = slow_glob

n = 20_000
table = pa.table({"stage": ["generate"] * n, "row_key": [f"row-{i}" for i in range(n)],
                  "reason": ["too long"] * n, "payload": ['{"tokens": 4096}'] * n})
DatasetStore(workspace).put("rejects", table, config={"big": True}, parents=[])
"""


def _big_table() -> pa.Table:
    n = 20_000
    return pa.table(
        {
            "stage": ["generate"] * n,
            "row_key": [f"row-{i}" for i in range(n)],
            "reason": ["too long"] * n,
            "payload": ['{"tokens": 4096}'] * n,
        }
    )


def _small(tag: str) -> pa.Table:
    return pa.table({"stage": ["s"], "row_key": ["a"], "reason": [tag], "payload": ["{}"]})


def _python(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _registered(store: DatasetStore) -> list[dict[str, object]]:
    return store.catalog.list_datasets() if store.catalog.path.exists() else []


def test_two_processes_registering_at_once_lose_nothing(tmp_path: Path) -> None:
    workspace, go, per_writer = tmp_path / "ws", tmp_path / "go", 20
    writers = [_python(WRITER, str(workspace), tag, str(per_writer), str(go)) for tag in ("a", "b")]
    store = DatasetStore(workspace)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{tag}").exists() for tag in ("a", "b")):  # both at the start line
        assert all(w.poll() is None for w in writers) and time.monotonic() < deadline
        time.sleep(0.005)
    go.touch()
    counts = []
    while any(w.poll() is None for w in writers):  # a reader querying throughout
        with contextlib.suppress(CatalogError):  # no catalog yet
            counts.append(
                run_readonly_query(store.catalog, store.lake, "select count(*) from datasets")[1][0][0]
            )
        time.sleep(0.01)
    for writer in writers:
        _, err = writer.communicate()
        assert writer.returncode == 0, err.decode()
    rows = store.catalog.list_datasets()
    assert len(rows) == 2 * per_writer
    numbers = sorted(int(str(r["name"]).removeprefix("rejects__v")) for r in rows)
    assert numbers == list(range(1, 2 * per_writer + 1))  # unique, no gaps
    _, reasons = run_readonly_query(
        store.catalog,
        store.lake,
        "select reason, count(*) from read_parquet("
        f"'{store.lake}/rejects/*/part-*.parquet') group by all order by 1",
    )
    assert reasons == [("a", 3 * per_writer), ("b", 3 * per_writer)]
    assert counts == sorted(counts) and len(counts) > 1  # the reader ran beside the writers
    assert not list((store.workspace / "lake" / "rejects").glob(".tmp-*"))


def test_threads_of_one_process_register_at_once(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    errors: list[BaseException] = []

    def write(tag: str) -> None:
        try:
            for i in range(10):
                store.put("rejects", _small(tag), config={"t": tag, "i": i}, parents=[])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r["name"] for r in store.catalog.list_datasets()) == sorted(
        f"rejects__v{n}" for n in range(1, 21)
    )


def test_a_query_holds_no_catalog_lock_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DatasetStore(tmp_path)
    store.put("rejects", _small("first"), config={"i": 1}, parents=[])
    monkeypatch.setattr(catalog_module, "_LOCK_TIMEOUT_S", 1.0)
    load = query_module._load_catalog

    def load_then_write(*args: object) -> None:
        load(*args)  # type: ignore[arg-type]
        # The query is about to run: a writer must get through right now, without waiting for it.
        store.put("rejects", _small("second"), config={"i": 2}, parents=[])

    monkeypatch.setattr(query_module, "_load_catalog", load_then_write)
    _, rows = run_readonly_query(store.catalog, store.lake, "select count(*) from datasets")
    assert rows == [(1,)]  # the query sees the snapshot it started with
    assert len(store.catalog.list_datasets()) == 2


def test_a_writer_waits_for_the_lock_then_gives_up_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DatasetStore(tmp_path)
    store.put("rejects", _small("first"), config={"i": 1}, parents=[])
    monkeypatch.setattr(catalog_module, "_LOCK_TIMEOUT_S", 0.3)
    with (
        file_lock(store.catalog.lock_path, shared=False, timeout_s=1),
        pytest.raises(CatalogError, match="is busy"),
    ):
        store.put("rejects", _small("second"), config={"i": 2}, parents=[])
    assert len(store.catalog.list_datasets()) == 1
    assert [p.name for p in (tmp_path / "lake" / "rejects").iterdir()] == [
        store.catalog.resolve("rejects").version
    ]


def _kill_at(point: str, workspace: Path, tmp_path: Path) -> None:
    flag = tmp_path / f"reached-{point}"
    proc = _python(CRASHER, str(workspace), point, str(flag))
    deadline = time.monotonic() + 30
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited before {point}: {proc.communicate()[1].decode()}")
        assert time.monotonic() < deadline, f"writer never reached {point}"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["parts", "published", "transaction"])
def test_writer_killed_mid_write_leaves_nothing_visible_and_the_next_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    workspace = tmp_path / "ws"
    _kill_at(point, workspace, tmp_path)
    store = DatasetStore(workspace)
    kind_dir = workspace / "lake" / "rejects"
    staging = [p for p in kind_dir.iterdir() if p.name.startswith(".tmp-")]
    visible = [p for p in kind_dir.iterdir() if not p.name.startswith(".")]
    if point == "parts":
        assert len(staging) == 1 and len(list(staging[0].glob("part-*.parquet"))) == 3
        assert visible == []
    else:  # complete files in place, but never registered: invisible to every reader
        assert staging == [] and len(visible) == 1
    assert _registered(store) == []
    assert store.lookup("rejects", {"big": True}, []) is None
    if store.catalog.path.exists():
        with pytest.raises(QueryError, match="does not exist"):
            run_readonly_query(store.catalog, store.lake, "select count(*) from rejects")

    # The next run (this process) completes, cleans the dead writer's staging and matches a clean run.
    monkeypatch.setattr(pio, "ROWS_PER_PART", 2000)
    ref = store.put("rejects", _big_table(), config={"big": True}, parents=[])
    clean = DatasetStore(tmp_path / "clean")
    clean_ref = clean.put("rejects", _big_table(), config={"big": True}, parents=[])
    assert (ref.number, ref.version, ref.row_count) == (1, clean_ref.version, 20_000)
    assert [p.name for p in kind_dir.iterdir()] == [ref.version]  # no staging left behind
    assert store.read(ref).equals(clean.read(clean_ref))
    assert run_readonly_query(store.catalog, store.lake, "select count(*) from rejects")[1] == [(20_000,)]
    assert [r["name"] for r in store.catalog.list_datasets()] == ["rejects__v1"]


def test_stale_staging_folders_are_removed_by_a_later_write(tmp_path: Path) -> None:
    kind_dir = tmp_path / "lake" / "rejects"
    kind_dir.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid, host = int(dead.stdout), pio._host_id()
    day_ago = time.time() - 2 * pio.STALE_STAGING_AGE_S
    folders = {
        f".tmp-v1-{dead_pid}-{host}-aaaaaaaa": (None, False),  # this host, writer dead
        f".tmp-v2-{os.getpid()}-{host}-bbbbbbbb": (None, True),  # this host, writer alive: kept
        f".tmp-v6-{os.getpid()}-{host}-ffffffff": (
            day_ago,
            False,
        ),  # alive but untouched for a day (pid reused)
        ".tmp-v3-4242-0badc0de-cccccccc": (day_ago, False),  # another host, old
        ".tmp-v4-4242-0badc0de-dddddddd": (None, True),  # another host, recent: kept
        ".tmp-v5-eeeeeeee": (day_ago, False),  # older naming, old
        ".keep-me": (day_ago, True),  # not a staging folder
    }
    for name, (mtime, _) in folders.items():
        (kind_dir / name).mkdir()
        (kind_dir / name / "part-00000.parquet").write_bytes(b"partial")
        if mtime is not None:
            os.utime(kind_dir / name, (mtime, mtime))
    ref = DatasetStore(tmp_path).put("rejects", _small("x"), config={}, parents=[])
    kept = {name for name, (_, keep) in folders.items() if keep}
    assert {p.name for p in kind_dir.iterdir()} == kept | {ref.version}
