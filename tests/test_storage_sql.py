"""`bvpo sql`: read-only guards (one test per refused statement class), lake confinement, output formats."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage import DatasetStore, QueryError, QueryRefused, run_readonly_arrow, run_readonly_query


def _rejects(n: int) -> pa.Table:
    return pa.table(
        {
            "stage": ["prompts"] * n,
            "row_key": [f"r{i}" for i in range(n)],
            "reason": ["bad"] * n,
            "payload": [json.dumps({"i": i}) for i in range(n)],
        }
    )


def _state(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DatasetStore:
    workdir = tmp_path / "cwd"  # relative paths in refused statements would land here
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    (tmp_path / "outside.csv").write_text("a\n1\n")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "outside.parquet")
    (tmp_path / "outside.json").write_text('[{"a": 1}]')
    store = DatasetStore(tmp_path / "ws")
    first = store.put("rejects", _rejects(2), config={"n": 2}, parents=[])
    store.put("rejects", _rejects(3), config={"n": 3}, parents=[first])
    return store


def _refused(store: DatasetStore, query: str) -> str:
    """Run a query that must be refused; check nothing changed anywhere; return the message."""
    root = store.workspace.parent
    before = _state(root), store.catalog.list_datasets()
    with pytest.raises(QueryRefused) as info:
        run_readonly_query(store.catalog, store.lake, query)
    assert (_state(root), store.catalog.list_datasets()) == before
    message = str(info.value)
    print(message)  # shown with -s
    return message


REFUSED = [
    ("INSERT", "insert into datasets select * from datasets"),
    ("UPDATE", "update datasets set row_count = 0"),
    ("DELETE", "delete from datasets"),
    ("CREATE", "create table copy_of as select * from datasets"),
    ("CREATE", "create or replace view rejects as select 1"),
    ("DROP", "drop view rejects"),
    ("ATTACH", "attach 'other.duckdb' as other"),
    ("COPY … TO", "copy (select * from datasets) to 'out.csv'"),
    ("COPY … TO", "copy datasets to '{lake}/rejects/stolen.parquet' (format parquet)"),
    ("INSTALL", "install httpfs"),
    ("LOAD", "load httpfs"),
    ("SET", "set enable_external_access = true"),
    ("SET", "set allowed_directories = ['/']"),
    ("PRAGMA", "pragma enable_profiling"),
    ("PRAGMA", "pragma memory_limit = '1GB'"),
    ("PRAGMA", "pragma table_info('datasets')"),  # read-only, but refused like every PRAGMA
    ("CALL", "call checkpoint()"),
    ("EXPORT", "export database 'dump'"),
    ("DELETE", "select 1; delete from datasets"),
]


@pytest.mark.parametrize(("statement_class", "query"), REFUSED, ids=[f"{c}:{q}" for c, q in REFUSED])
def test_each_writing_statement_class_is_refused_and_nothing_changes(
    store: DatasetStore, statement_class: str, query: str
) -> None:
    message = _refused(store, query.format(lake=store.lake))
    assert message == f"refused: {statement_class} statements are not allowed; bvpo sql is read-only"


@pytest.mark.parametrize(
    ("statement_class", "query", "detail"),
    [
        ("DELETE", "with d as (delete from datasets returning *) select * from d", "inside a WITH clause"),
        ("INSERT", "explain analyze insert into datasets select * from datasets", "inside EXPLAIN"),
        ("COPY … TO", "explain analyze copy datasets to 'x.csv'", "inside EXPLAIN"),
    ],
)
def test_writes_hidden_in_a_select_or_explain_are_refused(
    store: DatasetStore, statement_class: str, query: str, detail: str
) -> None:
    message = _refused(store, query)
    assert (
        message == f"refused: {statement_class} statements are not allowed ({detail}); bvpo sql is read-only"
    )


@pytest.mark.parametrize(
    "query",
    [
        "select * from read_csv('{outside}/outside.csv')",
        "select * from read_parquet('{outside}/outside.parquet')",
        "select * from read_json('{outside}/outside.json')",
        "select * from read_text('/etc/hostname')",
        "select * from glob('/etc/*')",
        "select * from parquet_metadata('{outside}/outside.parquet')",
        "select * from read_csv('{lake}/../../outside.csv')",  # '..' out of the lake
        "select * from read_blob('{workspace}/catalog.duckdb')",
    ],
)
def test_file_functions_cannot_read_outside_the_lake(store: DatasetStore, query: str) -> None:
    root = store.workspace.parent
    before = _state(root)
    sql = query.format(outside=root, lake=store.lake, workspace=store.workspace)
    with pytest.raises(QueryError, match="Permission Error") as info:
        run_readonly_query(store.catalog, store.lake, sql)
    assert not isinstance(info.value, QueryRefused)  # stopped by DuckDB's confinement, the second guard
    assert _state(root) == before


def test_reading_lake_files_directly_keeps_working(store: DatasetStore) -> None:
    glob = f"{store.lake}/rejects/*/part-*.parquet"
    assert run_readonly_query(store.catalog, store.lake, f"select count(*) from read_parquet('{glob}')")[
        1
    ] == [(5,)]
    _, rows = run_readonly_query(store.catalog, store.lake, f"select count(*) from glob('{glob}')")
    assert rows == [(2,)]


def test_views_per_kind_per_version_and_the_datasets_table(store: DatasetStore) -> None:
    def one(sql: str) -> object:
        return run_readonly_query(store.catalog, store.lake, sql)[1][0][0]

    assert one("select count(*) from rejects") == 3  # the latest version
    assert one("select count(*) from rejects__v1") == 2
    assert one("select count(*) from REJECTS__V2") == 3
    assert one("select count(*) from datasets") == 2
    assert one("explain select * from rejects") is not None
    columns, _ = run_readonly_query(store.catalog, store.lake, "describe rejects")
    assert "column_name" in columns


def test_a_dataset_with_missing_files_fails_only_queries_that_use_it(store: DatasetStore) -> None:
    v1 = store.catalog.resolve("rejects__v1")
    for part in Path(v1.path).glob("part-*.parquet"):
        part.unlink()
    with pytest.raises(
        QueryError, match=rf"dataset rejects__v1 \(version {v1.version}, path .*\) cannot be read"
    ):
        run_readonly_query(store.catalog, store.lake, "select count(*) from rejects__v1")
    assert run_readonly_query(store.catalog, store.lake, "select count(*) from rejects")[1] == [(3,)]


def test_query_errors_are_query_errors(store: DatasetStore) -> None:
    with pytest.raises(QueryError, match="cannot parse"):
        run_readonly_query(store.catalog, store.lake, "selec 1")
    with pytest.raises(QueryError, match="does not exist"):
        run_readonly_query(store.catalog, store.lake, "select * from no_such_table")


# --- the command line -------------------------------------------------------------------------------------


def _cli(store: DatasetStore, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["sql", "-w", str(store.workspace), *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("query", "statement_class"),
    [("insert into datasets select * from datasets", "INSERT"), ("pragma enable_profiling", "PRAGMA")],
)
def test_cli_refusal_is_one_line_and_exit_1(store: DatasetStore, query: str, statement_class: str) -> None:
    before = _state(store.workspace.parent)
    code, out, err = _cli(store, query)
    assert code == 1 and out == ""
    assert err == f"refused: {statement_class} statements are not allowed; bvpo sql is read-only\n"
    assert _state(store.workspace.parent) == before


def test_cli_table_output(store: DatasetStore) -> None:
    code, out, _ = _cli(store, "select row_key, reason from rejects order by row_key")
    assert code == 0
    assert out.splitlines() == ["row_key\treason", "r0\tbad", "r1\tbad", "r2\tbad"]


def test_cli_writes_csv_json_and_parquet_files(store: DatasetStore, tmp_path: Path) -> None:
    query = "select name, row_count, parents from datasets order by number"
    expected = run_readonly_arrow(store.catalog, store.lake, query)

    code, _, err = _cli(store, query, "--format", "parquet", "--output", str(tmp_path / "out.parquet"))
    assert code == 0 and "wrote 2 rows" in err
    assert pq.read_table(tmp_path / "out.parquet").equals(expected)

    code, _, _ = _cli(store, query, "-f", "csv", "-o", str(tmp_path / "out.csv"))
    assert code == 0
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == '"name","row_count","parents"'
    assert lines[1] == '"rejects__v1",2,"[]"'
    assert lines[2].startswith('"rejects__v2",3,"[""rejects:')  # lists become JSON text

    code, _, _ = _cli(store, query, "--format", "json", "--output", str(tmp_path / "out.json"))
    assert code == 0
    rows = json.loads((tmp_path / "out.json").read_text())
    assert rows == expected.to_pylist()
    assert not list(tmp_path.glob(".*.partial"))


def test_cli_csv_and_json_go_to_stdout_without_output(store: DatasetStore) -> None:
    code, out, _ = _cli(store, "select 1 as a, 'x' as b", "--format", "json")
    assert code == 0 and json.loads(out) == [{"a": 1, "b": "x"}]
    code, out, _ = _cli(store, "select 1 as a, 'x' as b", "--format", "csv")
    assert code == 0 and out.splitlines() == ['"a","b"', '1,"x"']


def test_cli_rejects_format_output_mismatches(store: DatasetStore, tmp_path: Path) -> None:
    code, _, err = _cli(store, "select 1", "--format", "parquet")
    assert code == 2 and "--format parquet needs --output" in err
    code, _, err = _cli(store, "select 1", "--output", str(tmp_path / "x.txt"))
    assert code == 2 and "--output needs --format" in err
    assert not (tmp_path / "x.txt").exists()


def test_cli_without_a_catalog_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sql", "-w", str(tmp_path / "none"), "select 1"])
    assert result.exit_code == 1 and "no catalog at" in result.stderr and "bvpo run" in result.stderr


def test_cli_datasets_and_lineage(store: DatasetStore) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["datasets", "-w", str(store.workspace)])
    assert listed.exit_code == 0
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == [
        "name",
        "rejects__v1",
        "rejects__v2",
    ]
    chain = runner.invoke(app, ["lineage", "rejects", "-w", str(store.workspace)])
    assert chain.exit_code == 0
    assert "rejects__v2" in chain.stdout and '  config: {"n": 2}' in chain.stdout
    missing = runner.invoke(app, ["lineage", "rejects__v9", "-w", str(store.workspace)])
    assert missing.exit_code == 1 and "no registered dataset matches 'rejects__v9'" in missing.stderr


# --- bvpo sql: a bounded table, queries from a file or stdin ------------------------------------------


def test_cli_table_shows_a_bounded_number_of_rows_and_says_how_to_get_all(store: DatasetStore) -> None:
    code, out, err = _cli(store, "select range as i from range(100000)")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "i" and lines[1:] == [str(i) for i in range(40)]
    assert "99,960 more row(s) not shown (40 of 100,000)" in err
    assert "--format csv" in err and "--output FILE" in err and "--max-rows" in err
    code, out, err = _cli(store, "select range as i from range(100000)", "--max-rows", "3")
    assert code == 0 and out.splitlines() == ["i", "0", "1", "2"] and "99,997 more" in err
    code, out, _ = _cli(store, "select range as i from range(100000)", "--format", "csv")
    assert code == 0 and len(out.splitlines()) == 100001  # other formats are never cut


def test_cli_table_of_a_result_that_fits_has_no_footer(store: DatasetStore) -> None:
    code, out, err = _cli(store, "select range as i from range(40)")
    assert code == 0 and len(out.splitlines()) == 41 and "not shown" not in err
    code, out, err = _cli(store, "select 1 as a where false")
    assert code == 0 and out.splitlines() == ["a"] and err == ""


def test_preview_streams_the_last_statement_and_counts_what_it_leaves_out(store: DatasetStore) -> None:
    from storage import run_readonly_preview

    kept, total = run_readonly_preview(
        store.catalog, store.lake, "select 1; select range as i from range(2500000)", 7
    )
    assert kept.column_names == ["i"] and kept.column("i").to_pylist() == list(range(7))
    assert total == 2_500_000
    kept, total = run_readonly_preview(
        store.catalog, store.lake, "select * from rejects order by row_key", 10
    )
    assert total == 3 and kept.num_rows == 3


def test_cli_reads_the_query_from_a_file_or_stdin(store: DatasetStore, tmp_path: Path) -> None:
    # a query far longer than one command-line argument may be (128 KiB on Linux)
    members = ", ".join(str(i) for i in range(0, 90_000, 3))
    long_query = f"select count(*) as n from range(90) where range in ({members})"
    assert len(long_query) > 128 * 1024
    (tmp_path / "q.sql").write_text(long_query)
    code, out, _ = _cli(store, "--file", str(tmp_path / "q.sql"))
    assert code == 0 and out.splitlines() == ["n", "30"]
    runner = CliRunner()
    for args in (["-"], ["--file", "-"]):
        result = runner.invoke(app, ["sql", "-w", str(store.workspace), *args], input="select 2 as two\n")
        assert result.exit_code == 0 and result.stdout.splitlines() == ["two", "2"], args


def test_cli_needs_exactly_one_readable_non_empty_query(store: DatasetStore, tmp_path: Path) -> None:
    (tmp_path / "q.sql").write_text("select 1")
    (tmp_path / "empty.sql").write_text("  \n")
    cases = {
        (): "Missing argument 'QUERY'",
        ("select 1", "--file", str(tmp_path / "q.sql")): "both a query and --file",
        ("--file", str(tmp_path / "missing.sql")): "cannot read the query file",
        ("--file", str(tmp_path / "empty.sql")): "the query is empty",
    }
    for args, message in cases.items():
        code, out, err = _cli(store, *args)
        assert code == 2 and out == "" and message in err, (args, err)
