from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from storage import DatasetStore, QueryError, SchemaError, run_readonly_query


def _rejects(n: int) -> pa.Table:
    return pa.table(
        {
            "stage": ["prompts"] * n,
            "row_key": [f"r{i}" for i in range(n)],
            "reason": ["bad"] * n,
            "payload": ["{}"] * n,
        }
    )


def test_put_registers_view_and_reuses_same_inputs(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    ref = store.put("rejects", _rejects(3), config={"a": 1}, parents=[])
    assert ref.row_count == 3 and ref.number == 1
    assert store.lookup("rejects", {"a": 1}, []) == ref
    assert store.lookup("rejects", {"a": 2}, []) is None
    _, rows = run_readonly_query(store.catalog, store.lake, "select count(*) from rejects")
    assert rows == [(3,)]
    # Different config: a new version, and the kind view follows the latest one.
    ref2 = store.put("rejects", _rejects(5), config={"a": 2}, parents=[ref])
    assert ref2.number == 2 and ref2.version != ref.version
    assert run_readonly_query(store.catalog, store.lake, "select count(*) from rejects")[1] == [(5,)]
    assert run_readonly_query(store.catalog, store.lake, "select count(*) from rejects__v1")[1] == [(3,)]
    parents, config = store.catalog.parents_of(ref2)
    assert parents == [ref.qualified] and config == {"a": 2}


def test_schema_mismatch_is_refused_and_nothing_registered(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    bad = _rejects(2).drop(["reason"])
    with pytest.raises(SchemaError, match="missing column"):
        store.put("rejects", bad, config={}, parents=[])
    assert store.lookup("rejects", {}, []) is None
    assert (
        not any((tmp_path / "lake" / "rejects").glob("*"))
        if (tmp_path / "lake" / "rejects").exists()
        else True
    )


def test_no_half_written_dataset_is_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.parquet_io as pio

    store = DatasetStore(tmp_path)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pio.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put("rejects", _rejects(2), config={}, parents=[])
    assert store.lookup("rejects", {}, []) is None
    assert list((tmp_path / "lake" / "rejects").iterdir()) == []


@pytest.mark.parametrize(
    "query",
    [
        "insert into datasets select * from datasets",
        "create table x as select 1",
        "drop view rejects",
        "copy (select 1) to 'out.csv'",
        "attach 'other.db'",
        "install httpfs",
        "set enable_external_access=true",
        "select 1; delete from datasets",
    ],
)
def test_sql_interface_refuses_writes(tmp_path: Path, query: str) -> None:
    store = DatasetStore(tmp_path)
    store.put("rejects", _rejects(1), config={}, parents=[])
    with pytest.raises(QueryError):
        run_readonly_query(store.catalog, store.lake, query)


def test_sql_interface_cannot_read_outside_the_lake(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    store.put("rejects", _rejects(1), config={}, parents=[])
    outside = tmp_path.parent / "secret.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(QueryError, match=r"disabled|Permission"):
        run_readonly_query(store.catalog, store.lake, f"select * from read_csv('{outside}')")


def test_lineage_walks_back_to_the_root_with_configs(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    root = store.put("rejects", _rejects(1), config={"stage": "root"}, parents=[])
    middle = store.put("rejects", _rejects(2), config={"stage": "middle"}, parents=[root])
    leaf = store.put("rejects", _rejects(3), config={"stage": "leaf"}, parents=[middle, root])
    chain = store.catalog.lineage(leaf)
    assert [(depth, ref.version, cfg["stage"]) for depth, ref, cfg in chain] == [
        (0, leaf.version, "leaf"),
        (1, middle.version, "middle"),
        (2, root.version, "root"),
        (1, root.version, "root"),
    ]
    assert store.catalog.resolve("rejects__v2") == middle
    assert store.catalog.resolve(f"rejects:{root.version}") == root
    assert store.catalog.resolve("rejects") == leaf
