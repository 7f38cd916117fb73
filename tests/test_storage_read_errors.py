"""Reading a registered dataset whose files were damaged: a DatasetReadError naming it, for each damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage.parquet_io as pio
from storage import DatasetReadError, DatasetRef, DatasetStore, run_readonly_query


def _rejects(n: int) -> pa.Table:
    return pa.table(
        {
            "stage": ["prompts"] * n,
            "row_key": [f"r{i}" for i in range(n)],
            "reason": ["bad"] * n,
            "payload": ["{}"] * n,
        }
    )


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DatasetStore, DatasetRef]:
    monkeypatch.setattr(pio, "ROWS_PER_PART", 10)
    store = DatasetStore(tmp_path)
    ref = store.put("rejects", _rejects(25), config={}, parents=[])
    assert sorted(p.name for p in Path(ref.path).iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    return store, ref


def _read_error(store: DatasetStore, ref: DatasetRef) -> str:
    with pytest.raises(DatasetReadError) as info:
        store.read(ref)
    message = str(info.value)
    assert message.startswith(
        f"dataset rejects__v1 (version {ref.version}, path {ref.path}) cannot be read: "
    )
    assert (info.value.name, info.value.version, info.value.path) == (ref.name, ref.version, ref.path)
    with pytest.raises(DatasetReadError):
        store.read_rows(ref)
    print(message)  # shown with -s
    return info.value.reason


def test_intact_dataset_reads_back(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    assert store.read(ref).equals(_rejects(25).cast(store.read(ref).schema))


def test_truncated_part(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    part = Path(ref.path) / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    reason = _read_error(store, ref)
    assert reason.startswith("part-00001.parquet is not a readable Parquet file (truncated or corrupted?)")


def test_corrupted_part(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    part = Path(ref.path) / "part-00002.parquet"
    data = bytearray(part.read_bytes())
    data[-40:] = b"\xff" * 40  # footer (schema, row groups) and magic bytes overwritten
    part.write_bytes(bytes(data))
    assert "part-00002.parquet is not a readable Parquet file" in _read_error(store, ref)


def test_not_parquet_at_all(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    (Path(ref.path) / "part-00000.parquet").write_text("stage,row_key\nprompts,r0\n")
    assert "part-00000.parquet is not a readable Parquet file" in _read_error(store, ref)


def test_missing_part_in_the_middle(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    (Path(ref.path) / "part-00001.parquet").unlink()
    assert _read_error(store, ref) == "part file(s) missing: part-00001.parquet"


def test_missing_last_part_is_caught_by_the_row_count(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    (Path(ref.path) / "part-00002.parquet").unlink()
    reason = _read_error(store, ref)
    assert reason.startswith("it holds 20 rows but 25 were registered")


def test_no_parts_left(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    for part in Path(ref.path).iterdir():
        part.unlink()
    assert _read_error(store, ref) == "its folder holds no part-*.parquet files"


def test_missing_dataset_folder(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    shutil.rmtree(ref.path)
    assert _read_error(store, ref) == "its folder is missing"
    # The stage rerun path: lookup no longer offers it, and writing it again restores it under its number.
    assert store.lookup("rejects", {}, []) is None
    again = store.put("rejects", _rejects(25), config={}, parents=[])
    assert again == ref and store.read(again).num_rows == 25
    assert run_readonly_query(store.catalog, store.lake, "select count(*) from datasets")[1] == [(1,)]


def test_schema_mismatch_wrong_type(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    part = Path(ref.path) / "part-00001.parquet"
    table = pq.read_table(part)
    table = table.set_column(2, "reason", pa.array(range(table.num_rows), pa.int64()))
    pq.write_table(table, part)
    assert (
        _read_error(store, ref)
        == "schema mismatch in part-00001.parquet: column 'reason' is int64, expected string"
    )


def test_schema_mismatch_missing_and_extra_columns(dataset: tuple[DatasetStore, DatasetRef]) -> None:
    store, ref = dataset
    part = Path(ref.path) / "part-00000.parquet"
    table = pq.read_table(part).drop(["payload"]).append_column("extra", pa.array([1] * 10))
    pq.write_table(table, part)
    assert (
        _read_error(store, ref)
        == "schema mismatch in part-00000.parquet: missing column(s) payload; unexpected column(s) extra"
    )


def test_only_a_column_marked_added_later_may_be_missing_from_an_older_version(tmp_path: Path) -> None:
    """An older eval_results part without ``round`` (added later) reads it as nulls; one without a
    nullable column that was always there (``ci_low``) is damaged and fails with the column named."""
    from storage.schemas import may_be_missing, schema_for

    assert [f.name for f in schema_for("eval_results") if may_be_missing(f)] == ["round"]
    store = DatasetStore(tmp_path)
    row = {
        "model_label": "reference", "model": "embedded", "mode": "trace", "metric": "score", "value": 0.5,
        "ci_low": 0.4,
        "ci_high": 0.6, "n": 3, "round": 0,
    }  # fmt: skip
    rows = pa.Table.from_pylist([row], schema=schema_for("eval_results"))
    older = store.put("eval_results", rows, config={}, parents=[])
    part = Path(older.path) / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop(["round"]), part)
    assert store.read_rows(older)[0]["round"] is None
    damaged = store.put("eval_results", rows, config={"v": 2}, parents=[])
    part = Path(damaged.path) / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop(["ci_low"]), part)
    with pytest.raises(DatasetReadError, match=r"missing column.*ci_low"):
        store.read_rows(damaged)
