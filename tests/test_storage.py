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


# --- layering and the lake location -----------------------------------------------------------------------


def test_storage_imports_none_of_the_other_layers() -> None:
    import ast

    for path in (Path(__file__).resolve().parents[1] / "storage").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in {"pipeline", "tasks", "flows"}, f"{path.name} imports {name}"


def test_lake_can_live_outside_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BVPO_LAKE", str(tmp_path / "elsewhere"))
    store = DatasetStore(tmp_path / "ws")
    ref = store.put("rejects", _rejects(4), config={}, parents=[])
    assert store.lake == tmp_path / "elsewhere" and ref.path == str(
        tmp_path / "elsewhere" / "rejects" / ref.version
    )
    assert run_readonly_query(store.catalog, store.lake, "select count(*) from rejects")[1] == [(4,)]
    assert not (tmp_path / "ws" / "lake").exists()


def test_object_store_code_path_on_a_local_stand_in(tmp_path: Path) -> None:
    """The s3:// branch of LakeFS (no rename, copy then delete) run against a local pyarrow filesystem."""
    import pyarrow.fs as pafs

    from storage import CatalogError, DatasetReadError, LakeFS

    bucket = tmp_path / "bucket-root"
    bucket.mkdir()
    lake = LakeFS("s3://bucket/lake/", filesystem=pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()))
    assert not lake.is_local and lake.root == "s3://bucket/lake" and lake.sql_prefix() == "s3://bucket/lake/"
    store = DatasetStore(tmp_path / "ws", lake=lake)
    ref = store.put("rejects", _rejects(3), config={}, parents=[])
    assert ref.path == f"s3://bucket/lake/rejects/{ref.version}"
    assert sorted(p.name for p in (bucket / "bucket" / "lake" / "rejects").iterdir()) == [ref.version]
    assert store.read(ref).num_rows == 3 and store.lookup("rejects", {}, []) == ref
    assert store.catalog.resolve("rejects") == ref
    (bucket / "bucket" / "lake" / "rejects" / ref.version / "part-00000.parquet").unlink()
    with pytest.raises(DatasetReadError, match=r"rejects__v1 \(version .*, path s3://bucket/lake/rejects/"):
        store.read(ref)
    # SQL over an object store needs DuckDB's httpfs, which is never downloaded here.
    if not _httpfs_installed():
        with pytest.raises(QueryError, match="needs DuckDB's httpfs extension"):
            run_readonly_query(store.catalog, lake, "select 1")
    with pytest.raises(CatalogError, match="no registered dataset"):
        store.catalog.resolve("rejects__vx")


def _httpfs_installed() -> bool:
    import duckdb

    with duckdb.connect(config={"autoinstall_known_extensions": False}) as conn:
        try:
            conn.execute("LOAD httpfs")
        except duckdb.Error:
            return False
    return True
