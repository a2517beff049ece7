"""Full-catalog scans executed by DuckDB, with the answer still decided by our Arrow filter.

Why: pyarrow decodes every row of every projected column before a filter can run (it has no row
selection inside a Parquet column chunk), so a selective query over 10 million rows spends most of
its time materialising strings it then drops. DuckDB evaluates the filter columns first and
materialises the other columns only for the rows that pass. When ``duckdb`` is installed, a
full scan therefore runs as one DuckDB query; without it, or for a query DuckDB cannot help with,
the pyarrow scanner (:mod:`distlabels.catalog.scan`) runs as before.

Correctness does not rest on SQL semantics. DuckDB and Arrow disagree on NaN: DuckDB sorts NaN
above every number (``NaN > 5`` and ``NaN = NaN`` are true) where Arrow, like numpy and pandas,
makes every ordered comparison with NaN false; and DuckDB prunes row groups by their min/max
statistics, which Parquet writers compute without NaN, so on our files it answers
``isnan(teff)`` or ``not (teff > 3000)`` without the NaN rows (reproduced in the tests). So the
``--where`` expression is translated into a *superset* condition: every row the Arrow expression
keeps, the SQL keeps, perhaps with a few more; the exact Arrow filter then runs on DuckDB's
(small) result. How:

* negations are pushed down to the comparisons (De Morgan holds in three-valued logic), so that
  a widened comparison can never be narrowed again by an enclosing ``not``;
* a comparison of a float column with a constant is pushed down only in a polarity that is false
  for NaN under Arrow (``teff < 4500``, ``not (teff != 0)``): rows DuckDB drops or prunes for NaN
  are rows Arrow drops too, and NaN rows DuckDB keeps (``NaN > 5``) are removed by Arrow later;
  ``teff != 0``, ``not (teff > 5000)``, ``isnan(teff)`` and ``isnull(teff)`` are not pushed down;
* integer and string columns have no NaN and SQL's NULL logic is Arrow's Kleene logic, so their
  comparisons, bit tests and ``in`` lists are pushed in either polarity (``not in`` keeps NULL
  rows, which Arrow's ``invert(is_in)`` keeps);
* constants compared with float columns are cast to the column's type, as the Arrow translator
  does (``teff > 0.1`` compares in float32);
* anything else (arithmetic, functions of columns, column against column) becomes TRUE.

A query whose translation is TRUE as a whole (nothing to push down) stays on the pyarrow path.
"""
from __future__ import annotations

import ast
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = ["available", "connect", "shared", "prefilter_sql", "duckdb_scan", "DuckDBFailed"]

_CMP_SQL = {ast.Eq: "=", ast.NotEq: "<>", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_NEGATED = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Gt: ast.LtE,
            ast.GtE: ast.Lt}
_FLIPPED = {ast.Eq: ast.Eq, ast.NotEq: ast.NotEq, ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt,
            ast.GtE: ast.LtE}
_VANISHED = ("no files found", "no such file", "cannot open file", "could not open file")


class DuckDBFailed(Exception):
    """DuckDB could not run the scan (e.g. fragments whose columns differ): use the Arrow path."""


def available() -> bool:
    """Whether the optional ``duckdb`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("duckdb") is not None


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _constant(node: ast.AST) -> tuple[bool, Any]:
    """(True, value) for a literal, with unary minus folded; (False, None) otherwise."""
    if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
        return True, node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        ok, v = _constant(node.operand)
        if ok and isinstance(v, (int, float)):
            return True, (-v if isinstance(node.op, ast.USub) else v)
    return False, None


class _Superset:
    """Translates a (validated) ``--where`` AST into SQL that keeps a superset of its rows.

    ``visit`` returns SQL text, or None meaning TRUE (no restriction).
    """

    def __init__(self, types: dict[str, pa.DataType]):
        self.types = types

    # -- boolean structure ---------------------------------------------------------------
    def visit(self, node: ast.AST, negate: bool = False) -> str | None:
        if isinstance(node, ast.BoolOp):
            return self._join(isinstance(node.op, ast.And) != negate, [self.visit(v, negate) for v in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)) and self._is_condition(node.operand):
            return self.visit(node.operand, not negate)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)) \
                and self._is_condition(node.left) and self._is_condition(node.right):
            both = isinstance(node.op, ast.BitAnd) != negate
            return self._join(both, [self.visit(node.left, negate), self.visit(node.right, negate)])
        if isinstance(node, ast.Compare):
            atoms = [self._compare(left, op, right, negate)
                     for left, op, right in zip([node.left] + node.comparators[:-1], node.ops, node.comparators)]
            return self._join(not negate, atoms)  # a < b < c is (a < b) and (b < c)
        if isinstance(node, ast.Call):
            return self._call(node, negate)
        return None

    @staticmethod
    def _join(conjunction: bool, parts: list[str | None]) -> str | None:
        kept = [p for p in parts if p is not None]  # conjunction: TRUE and x == x
        if not kept or (not conjunction and len(kept) < len(parts)):  # TRUE or x == TRUE
            return None
        return kept[0] if len(kept) == 1 else f" {'AND' if conjunction else 'OR'} ".join(f"({p})" for p in kept)

    def _is_condition(self, node: ast.AST) -> bool:
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isnan", "isnull"):
            return True
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
            return self._is_condition(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            return self._is_condition(node.left) and self._is_condition(node.right)
        if isinstance(node, ast.Name):
            t = self.types.get(node.id)
            return t is not None and pa.types.is_boolean(t)
        return False

    # -- atoms -----------------------------------------------------------------------------
    def _column(self, node: ast.AST) -> tuple[str, pa.DataType] | None:
        if isinstance(node, ast.Name) and node.id in self.types:
            return node.id, self.types[node.id]
        return None

    @staticmethod
    def _literal(value: Any, typ: pa.DataType) -> str | None:
        """The constant as SQL comparable with a column of type ``typ`` exactly as Arrow compares."""
        if pa.types.is_floating(typ) and isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if math.isnan(v) or typ.bit_width not in (32, 64):
                return None
            text = repr(v) if math.isfinite(v) else _string("inf" if v > 0 else "-inf")
            return f"CAST({text} AS {'REAL' if typ.bit_width == 32 else 'DOUBLE'})"
        if pa.types.is_integer(typ) and isinstance(value, int) and not isinstance(value, bool):
            return str(int(value))
        if (pa.types.is_string(typ) or pa.types.is_large_string(typ)) and isinstance(value, str):
            return _string(value)
        return None

    def _operand(self, node: ast.AST) -> tuple[str, str, pa.DataType] | None:
        """(SQL, column name, column type) for a column or a bit test ``col & K`` of an int column."""
        col = self._column(node)
        if col is not None:
            return ident(col[0]), col[0], col[1]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            col = self._column(node.left)
            ok, k = _constant(node.right)
            if col is None:
                col, (ok, k) = self._column(node.right), _constant(node.left)
            if col is not None and ok and isinstance(k, int) and pa.types.is_integer(col[1]):
                sym = "&" if isinstance(node.op, ast.BitAnd) else "|"
                # Arrow widens to int64 with an int64 literal; so does the SQL
                return f"(CAST({ident(col[0])} AS BIGINT) {sym} {int(k)})", col[0], pa.int64()
        return None

    def _compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST, negate: bool) -> str | None:
        if isinstance(op, (ast.In, ast.NotIn)):
            return self._isin(left, right, isinstance(op, ast.NotIn) != negate)
        if type(op) not in _CMP_SQL:
            return None
        side = self._operand(left)
        ok, value = _constant(right)
        if side is None or not ok:
            side, (ok, value), op = self._operand(right), _constant(left), _FLIPPED[type(op)]()
            if side is None or not ok:
                return None
        sql_col, _, typ = side
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            if not isinstance(op, (ast.Eq, ast.NotEq)):
                return None  # orderings of strings: leave to Arrow (collations differ)
        if pa.types.is_floating(typ) and isinstance(op, ast.NotEq) != negate:
            return None  # true for NaN under Arrow: DuckDB may prune such rows by their statistics
        lit = self._literal(value, typ)
        if lit is None:
            return None
        if negate:
            op = _NEGATED[type(op)]()
        return f"{sql_col} {_CMP_SQL[type(op)]} {lit}"

    def _isin(self, left: ast.AST, right: ast.AST, negate: bool) -> str | None:
        col = self._column(left)
        if col is None or not isinstance(right, (ast.Tuple, ast.List, ast.Set)) or not right.elts:
            return None
        if negate and pa.types.is_floating(col[1]):
            return None  # 'not in' holds for NaN
        lits = []
        for elt in right.elts:
            ok, value = _constant(elt)
            lit = self._literal(value, col[1]) if ok else None
            if lit is None:
                return None
            lits.append(lit)
        c = ident(col[0])
        # Arrow's invert(is_in) keeps NULL rows; SQL's NOT IN gives NULL for them
        return f"{c} NOT IN ({', '.join(lits)}) OR {c} IS NULL" if negate else f"{c} IN ({', '.join(lits)})"

    def _call(self, node: ast.Call, negate: bool) -> str | None:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        col = self._column(node.args[0]) if len(node.args) == 1 else None
        if col is None:
            return None
        c, floating = ident(col[0]), pa.types.is_floating(col[1])
        if name == "isnan" and floating and negate:
            return f"NOT isnan({c})"
        if name == "isnull" and negate:  # not missing and not NaN
            return f"{c} IS NOT NULL" + (f" AND NOT isnan({c})" if floating else "")
        if name == "isnull" and not floating:
            return f"{c} IS NULL"
        return None  # isnan(x), isnull(x) of a float: true for NaN, which statistics leave out


def prefilter_sql(wheres: Sequence[str], schema: pa.Schema) -> str | None:
    """SQL condition keeping at least every row that all ``wheres`` (validated ``--where`` strings)
    keep under Arrow's semantics; None when nothing can be pushed down."""
    types = {f.name: f.type for f in schema}
    tr = _Superset(types)
    parts = [tr.visit(ast.parse(w.strip(), mode="eval").body) for w in wheres]
    return _Superset._join(True, parts)


_SHARED: dict[str, Any] = {}  # the process's database for a catalog's first scan (no caches)
_SHARED_LOCK = threading.Lock()


def shared(threads: int) -> Any:
    """The process's DuckDB database, for a :class:`~distlabels.catalog.query.Catalog`'s first
    scan: a new connection costs ~20-30 ms, a cursor on this one nothing. It keeps no Parquet
    metadata and no file data (DuckDB caches local files only when asked), so a query through it
    costs what it would cost on a fresh connection, minus the connecting."""
    import duckdb

    with _SHARED_LOCK:
        if "db" not in _SHARED:
            _SHARED["db"] = duckdb.connect(":memory:", config={"threads": max(1, int(threads))})
            _SHARED["threads"] = threads
        elif _SHARED["threads"] != threads:  # a database-wide setting: changed only when asked
            _SHARED["db"].execute(f"SET threads = {max(1, int(threads))}")
            _SHARED["threads"] = threads
        return _SHARED["db"]


def connect(threads: int) -> Any:
    """A DuckDB in-memory database for one :class:`~distlabels.catalog.query.Catalog` from its
    second scan on (a session).

    Its Parquet metadata cache is on: DuckDB re-reads a footer whenever the file's mtime is not
    at least 10 s older than the cached read, and the catalog drops the whole database when the
    (path, inode) listing changes, so a footer cached from a file that compact or a run replaced
    (always by a rename: a new inode, a new mtime) is never used to read its successor.
    """
    import duckdb

    con = duckdb.connect(":memory:", config={"threads": max(1, int(threads))})
    con.execute("SET parquet_metadata_cache = true")
    return con


def duckdb_scan(con: Any, files: Sequence[Path], out_schema: pa.Schema, where_sql: str) -> pa.Table:
    """Rows of ``files`` passing ``where_sql``, columns and types of ``out_schema``, read by DuckDB.

    Raises FileNotFoundError when a file vanished (compact swapped the tree: the caller retries),
    DuckDBFailed for anything else DuckDB cannot do (the caller falls back to pyarrow).
    """
    import duckdb

    cols = ", ".join(ident(c) for c in out_schema.names)
    listing = ", ".join(_string(str(f)) for f in files)
    sql = f"SELECT {cols} FROM read_parquet([{listing}], hive_partitioning = false) WHERE {where_sql}"
    cur = con.cursor()  # its own connection to the database: concurrent queries of one catalog
    try:
        table = cur.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, duckdb.IOException) and any(s in first.lower() for s in _VANISHED):
            raise FileNotFoundError(first) from None
        raise DuckDBFailed(first) from None
    finally:
        cur.close()
    try:
        return table.cast(out_schema) if not table.schema.equals(out_schema) else table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise DuckDBFailed(str(e)) from None
