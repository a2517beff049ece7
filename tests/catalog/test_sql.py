"""Full scans through DuckDB: the same rows as numpy (NaN), as the Arrow engine (NULL), for random
expressions, on files whose row-group statistics make DuckDB's own answers wrong for NaN."""
from __future__ import annotations

import operator
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distlabels import paths
from distlabels.catalog import sql
from distlabels.catalog.query import open_catalog
from distlabels.errors import QueryError

N_ROWS, N_FILES, ROW_GROUP = 3000, 24, 40
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
       "!=": operator.ne}


def _columns(rng: np.random.Generator, nulls: bool) -> dict[str, pa.Array]:
    x = rng.choice(np.array([-1.5, 0.1, 0.5, 2.0, 3.25], np.float32), N_ROWS)  # repeated values: ties
    x[rng.random(N_ROWS) < 0.1] = np.nan
    y = rng.normal(0.0, 1.0, N_ROWS)
    y[rng.random(N_ROWS) < 0.1] = np.nan
    k = rng.integers(0, 8, N_ROWS)
    s = rng.choice(np.array(["apogee", "boss", "lamost"]), N_ROWS)
    cols = {"source_id": pa.array([f"r{i:05d}" for i in range(N_ROWS)]), "x": pa.array(x), "y": pa.array(y),
            "k": pa.array(k), "s": pa.array(s)}
    if nulls:  # NULLs besides NaN (a column missing in an old fragment reads as NULL)
        for name in ("x", "k", "s"):
            mask = pa.array(rng.random(N_ROWS) < 0.05)
            cols[name] = pa.compute.if_else(mask, pa.nulls(N_ROWS, cols[name].type), cols[name])
    return cols


def _write(root: Path, table: pa.Table) -> None:
    """N_FILES fragments of small row groups, rows sorted by x (NaN last) inside each: many row
    groups whose min/max (computed without NaN) exclude a condition their NaN rows satisfy."""
    for i, idx in enumerate(np.array_split(np.arange(table.num_rows), N_FILES)):
        part = table.take(pa.array(idx)).sort_by([("x", "ascending")])
        path = paths.fragment_path(root, 0, i % 12, f"part-{i // 12:04d}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, path, row_group_size=ROW_GROUP)


@pytest.fixture(scope="module")
def nan_catalog(tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("sqlcat")
    table = pa.table(_columns(np.random.default_rng(5), nulls=False))
    _write(root, table)
    return root, table


@pytest.fixture(scope="module")
def null_catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sqlnull")
    _write(root, pa.table(_columns(np.random.default_rng(6), nulls=True)))
    return root


def _random_expr(rng: np.random.Generator, depth: int = 0) -> tuple[str, object]:
    """(--where text, numpy evaluator over a dict of arrays) of a random condition."""
    if depth < 2 and rng.random() < 0.55:
        kind = rng.choice(["and", "or", "not"])
        if kind == "not":
            text, fn = _random_expr(rng, depth + 1)
            return f"not ({text})", lambda d, f=fn: ~f(d)
        (ta, fa), (tb, fb) = _random_expr(rng, depth + 1), _random_expr(rng, depth + 1)
        join = operator.and_ if kind == "and" else operator.or_
        return f"({ta}) {kind} ({tb})", lambda d, f=fa, g=fb, j=join: j(f(d), g(d))
    atom = rng.choice(["x", "y", "k", "bits", "s", "in", "isnan", "isnull", "chain", "flip"])
    op = str(rng.choice(list(OPS)))
    if atom in ("x", "y", "flip"):
        col = "x" if atom != "y" else "y"
        c = float(rng.choice([-1.5, 0.1, 0.5, 2.0, 3.25, -0.3, 0.0]))
        if atom == "flip":  # constant on the left
            return f"{c!r} {op} x", lambda d, o=OPS[op], c=np.float32(c): o(c, d["x"])
        lit = np.float32(c) if col == "x" else c  # float32 columns compare in float32, as numpy
        return f"{col} {op} {c!r}", lambda d, o=OPS[op], col=col, lit=lit: o(d[col], lit)
    if atom == "k":
        c = int(rng.integers(0, 8))
        return f"k {op} {c}", lambda d, o=OPS[op], c=c: o(d["k"], c)
    if atom == "bits":
        b = int(rng.choice([1, 2, 4, 6]))
        return f"k & {b} == 0", lambda d, b=b: (d["k"] & b) == 0
    if atom == "s":
        v, eq = str(rng.choice(["apogee", "boss", "gaia"])), op in ("==", "<", "<=")
        return (f"s {'==' if eq else '!='} '{v}'", lambda d, v=v, eq=eq: (d["s"] == v) if eq else (d["s"] != v))
    if atom == "in":
        col = str(rng.choice(["x", "k", "s"]))
        vals = {"x": [0.1, 2.0], "k": [1, 3, 5], "s": ["boss", "lamost"]}[col]
        neg = bool(rng.random() < 0.5)
        lits = {"x": np.float32, "k": int, "s": str}[col]
        text = f"{col} {'not in' if neg else 'in'} ({', '.join(repr(v) for v in vals)})"
        return text, lambda d, col=col, vals=[lits(v) for v in vals], neg=neg: np.isin(d[col], vals) != neg
    if atom == "isnan":
        return "isnan(x)", lambda d: np.isnan(d["x"])
    if atom == "isnull":
        return "isnull(y)", lambda d: np.isnan(d["y"])
    lo, hi = sorted(float(v) for v in rng.choice([-1.5, 0.1, 0.5, 2.0], 2))
    return f"{lo!r} <= x < {hi!r}", lambda d, lo=np.float32(lo), hi=np.float32(hi): (d["x"] >= lo) & (d["x"] < hi)


def _ids(t: pa.Table) -> list[str]:
    return sorted(t.column("source_id").to_pylist())


def test_duckdb_engine_matches_numpy_on_random_conditions(nan_catalog) -> None:
    """150 random conditions (negations, NaN, ties, float32 literals, bit tests, strings, in-lists)
    give exactly numpy's rows, through DuckDB with the pushed-down superset, and through Arrow."""
    root, table = nan_catalog
    data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("x", "y", "k", "s")}
    ids = np.asarray(table.column("source_id").to_pylist())
    rng = np.random.default_rng(11)
    used = 0
    for _ in range(150):
        text, fn = _random_expr(rng)
        expected = sorted(ids[fn(data)])
        duck = open_catalog(root, engine="duckdb")
        got = duck.query(where=text, columns=["source_id"])
        assert _ids(got) == expected, text
        used += duck.last_engine == "duckdb"
        assert _ids(open_catalog(root, engine="arrow").query(where=text, columns=["source_id"])) == expected, text
    assert used > 60  # most conditions had something to push down


def test_nan_rows_survive_statistics_that_exclude_nan(nan_catalog) -> None:
    """Conditions true for NaN (not pushed down: DuckDB 2.0 itself answers ``isnan(x)`` on such
    files without the NaN rows, pruned by row-group min/max) still return every NaN row."""
    root, table = nan_catalog
    x = table.column("x").to_numpy(zero_copy_only=False)
    n_nan = int(np.isnan(x).sum())
    cat = open_catalog(root, engine="duckdb")
    for where, n in (("isnan(x)", n_nan), ("not (x > -2)", n_nan), ("not (x < 5) or k == 99", n_nan),
                     ("x != 0.5", int((x != np.float32(0.5)).sum()))):
        assert cat.query(where=where, columns=["source_id"]).num_rows == n, where
    assert n_nan > 100


@pytest.mark.parametrize("where", ["k not in (1, 3)", "not (k in (1, 3))", "s != 'boss'", "not (s == 'boss')",
                                   "x < 2 or k > 4", "not (x >= 0.5 or k != 2)", "isnull(k) or s == 'lamost'",
                                   "not isnull(x) and not isnull(s)", "k & 2 == 2 and x <= 2",
                                   "not (isnan(x)) and s in ('apogee', 'boss')"])
def test_duckdb_engine_equals_arrow_engine_with_nulls(null_catalog, where) -> None:
    """NULLs (besides NaN): SQL's three-valued logic and Arrow's Kleene logic keep the same rows."""
    arrow = open_catalog(null_catalog, engine="arrow").query(where=where, columns=["source_id", "x", "k", "s"])
    duck = open_catalog(null_catalog, engine="duckdb")
    got = duck.query(where=where, columns=["source_id", "x", "k", "s"])
    assert duck.last_engine == "duckdb"
    assert got.schema == arrow.schema
    # NaN-aware comparison of rows and values (Table.equals treats NaN as unequal)
    pd.testing.assert_frame_equal(got.sort_by("source_id").to_pandas(), arrow.sort_by("source_id").to_pandas())


def test_prefilter_pushes_only_what_is_safe() -> None:
    schema = pa.schema([("teff", pa.float32()), ("flags", pa.int64()), ("survey", pa.string())])
    q1 = sql.prefilter_sql(["teff < 4500 and flags == 0"], schema)
    assert q1 == '("teff" < CAST(4500.0 AS REAL)) AND ("flags" = 0)'
    # true for NaN under Arrow, so nothing is pushed: DuckDB statistics would drop NaN rows
    for where in ("not (teff > 5000)", "teff != 5000", "isnan(teff)", "isnull(teff)", "abs(teff) < 3"):
        assert sql.prefilter_sql([where], schema) is None, where
    assert sql.prefilter_sql(["not (teff != 5000)"], schema) == '"teff" = CAST(5000.0 AS REAL)'
    assert sql.prefilter_sql(["not (flags & 4 == 0 or survey in ('a', 'b'))"], schema) == \
        "((CAST(\"flags\" AS BIGINT) & 4) <> 0) AND (\"survey\" NOT IN ('a', 'b') OR \"survey\" IS NULL)"
    assert sql.prefilter_sql(["survey == \"it's\""], schema) == "\"survey\" = 'it''s'"


def test_fragments_of_another_schema_fall_back_to_arrow(nan_catalog, tmp_path) -> None:
    """A fragment whose column has another type (an older run): the answer is still exact."""
    root, table = nan_catalog
    import shutil

    shutil.copytree(root, tmp_path / "c")
    first = paths.list_fragments(tmp_path / "c")[0]
    old = pq.read_table(first)
    pq.write_table(old.set_column(old.schema.get_field_index("k"), "k", old.column("k").cast(pa.string())), first)
    cat = open_catalog(tmp_path / "c", engine="duckdb")
    got = cat.query(where="x < 1", columns=["source_id", "x"])
    x = table.column("x").to_numpy(zero_copy_only=False)
    assert got.num_rows == int((x < np.float32(1)).sum())


def test_engine_errors(nan_catalog) -> None:
    root, _ = nan_catalog
    with pytest.raises(QueryError, match="unknown query engine"):
        open_catalog(root, engine="spark")
    import pyarrow.fs as pafs

    with pytest.raises(QueryError, match="local files"):
        open_catalog(root, engine="duckdb", filesystem=pafs.LocalFileSystem())
    auto = open_catalog(root, filesystem=pafs.LocalFileSystem())  # auto with a filesystem: Arrow
    auto.query(where="x < 1", columns=["source_id"])
    assert auto.last_engine == "arrow"


def test_cli_engine_option(nan_catalog) -> None:
    root, table = nan_catalog
    x = table.column("x").to_numpy(zero_copy_only=False)
    out = {}
    for engine in ("arrow", "duckdb"):
        r = subprocess.run([sys.executable, "-m", "distlabels", "query", str(root), "--where", "x >= 2",
                            "--columns", "source_id", "--format", "csv", "--engine", engine],
                           capture_output=True, text=True, check=True)
        out[engine] = sorted(r.stdout.splitlines()[1:])
    assert out["arrow"] == out["duckdb"] and len(out["arrow"]) == int((x >= np.float32(2)).sum())
    r = subprocess.run([sys.executable, "-m", "distlabels", "query", "--help"], capture_output=True, text=True)
    assert "--engine" in r.stdout and "duckdb" in r.stdout


def test_without_duckdb_auto_uses_arrow_and_duckdb_engine_says_how_to_install(nan_catalog, monkeypatch) -> None:
    root, table = nan_catalog
    monkeypatch.setattr(sql, "available", lambda: False)  # as on a machine without the package
    cat = open_catalog(root)
    got = cat.query(where="x < 1", columns=["source_id"])
    x = table.column("x").to_numpy(zero_copy_only=False)
    assert cat.last_engine == "arrow" and got.num_rows == int((x < np.float32(1)).sum())
    with pytest.raises(QueryError, match="pip install duckdb"):
        open_catalog(root, engine="duckdb")


def test_one_catalog_sees_a_fragment_replaced_at_the_same_path(nan_catalog, tmp_path) -> None:
    """A session's DuckDB keeps Parquet footers cached; a fragment replaced by a rename (as runs
    and compact do) at the same path must be read anew, not through the old footer."""
    import os
    import shutil

    root, _ = nan_catalog
    shutil.copytree(root, tmp_path / "c")
    cat = open_catalog(tmp_path / "c", engine="duckdb")
    frag = paths.list_fragments(tmp_path / "c")[3]
    before = cat.query(where="k >= 0", columns=["source_id", "k"])
    old = pq.read_table(frag)
    new = old.set_column(old.schema.get_field_index("k"), "k", pa.array(np.full(old.num_rows, 100, np.int64)))
    new = pa.concat_tables([new, new.slice(0, 5).set_column(0, "source_id", pa.array([f"new{i}" for i in range(5)]))])
    tmp = frag.with_name(".swap.parquet.tmp")
    pq.write_table(new, tmp, row_group_size=ROW_GROUP)
    os.replace(tmp, frag)
    after = cat.query(where="k >= 100", columns=["source_id", "k"])
    assert cat.last_engine == "duckdb"
    assert sorted(after.column("source_id").to_pylist()) == sorted(new.column("source_id").to_pylist())
    assert cat.query(where="k >= 0", columns=["source_id"]).num_rows == before.num_rows + 5
