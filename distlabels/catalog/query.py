"""Read a label catalog: safe ``--where`` expressions, cone searches that prune sky pixels, output.

``--where`` is parsed with :mod:`ast` and translated node by node into an Arrow expression; nothing
is ever evaluated by Python. Cone searches open only ``Npix=N`` directories that can touch the cone.
"""
from __future__ import annotations

import ast
import difflib
import functools
import io
import json
import math
import operator
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from distlabels import paths
from distlabels.errors import QueryError, StoreError

from .scan import PART_SCHEMA as _PART_SCHEMA
from . import sql as _sql
from .scan import PARTITION_COLUMNS, SCAN_MIN_FILES, apply_filter, file_dataset, pixels_touching_cone, read_files, scan_dataset
from .scan import Vanished as _Vanished
from .scan import angular_separation

__all__ = ["Catalog", "CleanSelection", "CLEAN", "open_catalog", "parse_where", "format_table", "angular_separation"]

_CHUNK_FILES = 64  # files read by one thread before one filter runs over their rows
ENGINES = ("auto", "duckdb", "arrow")
FUNCTIONS = ("abs", "isnan", "isnull")
_ALLOWED = ("use columns, constants, comparisons, and/or/not, + - * /, abs(), isnan(), isnull(), "
            "bit tests like flags & 4 == 0 and x in (a, b)")
_CMP = {ast.Eq: pc.equal, ast.NotEq: pc.not_equal, ast.Lt: pc.less, ast.LtE: pc.less_equal,
        ast.Gt: pc.greater, ast.GtE: pc.greater_equal}
_ARITH = {ast.Add: (pc.add, operator.add), ast.Sub: (pc.subtract, operator.sub),
          ast.Mult: (pc.multiply, operator.mul), ast.Div: (pc.divide, operator.truediv)}
_NODE_NAMES = {"Attribute": "attribute access", "Subscript": "indexing", "IfExp": "conditional expressions",
               **dict.fromkeys(("ListComp", "SetComp", "DictComp", "GeneratorExp"), "comprehensions"),
               **dict.fromkeys(("List", "Tuple", "Set", "Dict"), "containers outside 'in'"),
               "NamedExpr": "assignment (:=)", "JoinedStr": "f-strings", "Lambda": "lambda"}
_LITERAL_TYPES = ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64()), (str, pa.string()))
_KINDS = ((pa.types.is_boolean, "bool"), (pa.types.is_integer, "int"), (pa.types.is_floating, "float"),
          (pa.types.is_string, "str"), (pa.types.is_large_string, "str"))
_NUM = ("int", "float")


@dataclass
class _Term:
    """A translated sub-expression, its Arrow type (None if unknown) and, for a literal, its
    Python value (cast later to the column's type: ``teff > 0.1`` compares in float32, as numpy)."""

    expr: pc.Expression
    type: pa.DataType | None
    const: Any = None
    is_const: bool = False


def _kind(t: pa.DataType | None) -> str:
    return "unknown" if t is None else next((name for test, name in _KINDS if test(t)), "other")


def _unknown_column(name: str, columns: Sequence[str], where: str) -> QueryError:
    close = difflib.get_close_matches(name, list(columns), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return QueryError(f"unknown column '{name}' in {where}{hint}; available: {', '.join(columns)}.")


class _Translator:
    """Walks a parsed expression and builds the Arrow expression; rejects everything else."""

    def __init__(self, source: str, columns: Sequence[str], types: Mapping[str, pa.DataType]):
        self.source, self.columns, self.types = source, list(columns), types

    def _snippet(self, node: ast.AST) -> str:
        seg = ast.get_source_segment(self.source, node) or type(node).__name__
        return seg if len(seg) <= 60 else seg[:57] + "..."

    def _parenthesized(self, node: ast.AST) -> bool:
        line = self.source.splitlines()[node.lineno - 1].encode()  # offsets count UTF-8 bytes
        return line[:node.col_offset].decode(errors="ignore").rstrip().endswith("(")

    def _forbid(self, what: str, node: ast.AST) -> QueryError:
        return QueryError(f"--where does not allow {what} ({self._snippet(node)!r}); {_ALLOWED}.")

    def _literal(self, value: Any, node: ast.AST) -> _Term:
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            raise QueryError(f"the integer {value} in --where does not fit in 64 bits.")
        for py_type, arrow_type in _LITERAL_TYPES:  # bool before int: True is an int in Python
            if isinstance(value, py_type):
                return _Term(pc.scalar(value), arrow_type, value, True)
        raise self._forbid("None (use isnull(x))" if value is None else type(value).__name__, node)

    @staticmethod
    def _match(a: _Term, b: _Term) -> tuple[pc.Expression, pc.Expression]:
        """Cast a numeric literal to the float type of the other side (numpy-like precision)."""
        def cast(lit: _Term, other: _Term) -> pc.Expression:
            if lit.is_const and not other.is_const and _kind(other.type) == "float" and _kind(lit.type) in _NUM:
                return pc.scalar(pa.scalar(float(lit.const), type=other.type))
            return lit.expr
        return cast(a, b), cast(b, a)

    def _require(self, term: _Term, kinds: tuple[str, ...], what: str, node: ast.AST) -> None:
        k = _kind(term.type)
        if k != "unknown" and k not in kinds:
            raise QueryError(f"{what} in --where needs {' or '.join(kinds)} operands, but "
                             f"{self._snippet(node)!r} is {term.type}.")

    def visit(self, node: ast.AST) -> _Term:
        name = type(node).__name__
        if not hasattr(self, f"visit_{name}"):
            raise self._forbid(_NODE_NAMES.get(name, f"{name} expressions"), node)
        return getattr(self, f"visit_{name}")(node)

    def visit_Name(self, node: ast.Name) -> _Term:
        if node.id not in self.columns:
            raise _unknown_column(node.id, self.columns, "--where")
        return _Term(pc.field(node.id), self.types.get(node.id))

    def visit_Constant(self, node: ast.Constant) -> _Term:
        return self._literal(node.value, node)

    def visit_BoolOp(self, node: ast.BoolOp) -> _Term:
        terms = [self.visit(v) for v in node.values]
        for v, t in zip(node.values, terms):
            self._require(t, ("bool",), "'and'/'or'", v)
        fn = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        return _Term(functools.reduce(fn, [t.expr for t in terms]), pa.bool_())

    def visit_UnaryOp(self, node: ast.UnaryOp) -> _Term:
        t = self.visit(node.operand)
        if isinstance(node.op, ast.Invert) and _kind(t.type) == "int":
            return _Term(pc.bit_wise_not(t.expr), t.type)  # ~ on an integer flips bits
        if isinstance(node.op, (ast.Not, ast.Invert)):
            self._require(t, ("bool",), "'not'/'~'", node.operand)
            return _Term(pc.invert(t.expr), pa.bool_())
        self._require(t, _NUM, "unary minus", node.operand)
        if isinstance(node.op, ast.UAdd) or t.is_const:  # fold -5: still a literal for type matching
            return t if isinstance(node.op, ast.UAdd) else self._literal(-t.const, node)
        return _Term(pc.negate(t.expr), t.type)

    def visit_BinOp(self, node: ast.BinOp) -> _Term:
        if isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            return self._bitop(node)
        if type(node.op) not in _ARITH:
            raise self._forbid("this operator", node)
        a, b = self.visit(node.left), self.visit(node.right)
        for t, side in ((a, node.left), (b, node.right)):
            self._require(t, _NUM, "arithmetic", side)
        arrow_fn, py_fn = _ARITH[type(node.op)]
        if a.is_const and b.is_const:  # plain number arithmetic, folded without eval
            try:
                return self._literal(py_fn(a.const, b.const), node)
            except ZeroDivisionError:
                raise QueryError(f"division by zero in --where ({self._snippet(node)!r}).") from None
        ea, eb = self._match(a, b)
        out_type = _arith_type(a, b)
        if isinstance(node.op, ast.Div) and _kind(out_type) in ("int", "unknown"):
            # Arrow divides integers with truncation; --where follows Python's true division
            ea, out_type = ea.cast(pa.float64()), pa.float64()
        return _Term(arrow_fn(ea, eb), out_type)

    def _bitop(self, node: ast.BinOp) -> _Term:
        a, b = self.visit(node.left), self.visit(node.right)
        ka, kb = _kind(a.type), _kind(b.type)
        sym = "&" if isinstance(node.op, ast.BitAnd) else "|"
        if "bool" in (ka, kb):  # (a > 1) & (b < 2): logical
            for t, side in ((a, node.left), (b, node.right)):
                self._require(t, ("bool",), f"'{sym}'", side)
            return _Term((pc.and_kleene if sym == "&" else pc.or_kleene)(a.expr, b.expr), pa.bool_())
        if ka in ("int", "unknown") and kb in ("int", "unknown"):  # flags & 4: bit test
            fn = pc.bit_wise_and if sym == "&" else pc.bit_wise_or
            return _Term(fn(a.expr, b.expr), b.type if a.is_const else a.type)
        raise QueryError(f"'{sym}' in --where joins integers or conditions, not {self._snippet(node)!r}; "
                         "put comparisons in parentheses, e.g. (teff > 5000) & (logg < 3).")

    def visit_Compare(self, node: ast.Compare) -> _Term:
        for mid in node.comparators[:-1]:  # 'a > 1 & b < 2' parses as 'a > (1 & b) < 2'
            if isinstance(mid, ast.BinOp) and isinstance(mid.op, (ast.BitAnd, ast.BitOr)) \
                    and not self._parenthesized(mid):
                raise QueryError(f"'&' and '|' bind tighter than comparisons ({self._snippet(node)!r}); "
                                 "put comparisons in parentheses, e.g. (teff > 5000) & (logg < 3).")
        if len(node.ops) > 1 and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            raise self._forbid("'in' inside a chained comparison", node)
        left, parts = self.visit(node.left), []
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                parts.append(self._isin(left, op, right_node))
                continue
            if type(op) not in _CMP:
                raise self._forbid("'is' / 'is not' (use == or isnull(x))", node)
            right = self.visit(right_node)
            ka, kb = _kind(left.type), _kind(right.type)
            if "unknown" not in (ka, kb) and (ka == "str") != (kb == "str"):
                raise QueryError(f"cannot compare {left.type} with {right.type} in --where "
                                 f"({self._snippet(node)!r}); quote strings, e.g. survey == 'apogee'.")
            parts.append(_CMP[type(op)](*self._match(left, right)))
            left = right
        return _Term(functools.reduce(pc.and_kleene, parts), pa.bool_())  # a < b < c: both hold

    def _isin(self, left: _Term, op: ast.cmpop, right: ast.AST) -> pc.Expression:
        if not isinstance(right, (ast.Tuple, ast.List, ast.Set)):
            raise QueryError(f"the right side of 'in' in --where must be a tuple of constants, "
                             f"e.g. survey in ('apogee', 'boss'), not {self._snippet(right)!r}.")
        terms = [self.visit(elt) for elt in right.elts]
        if not all(t.is_const for t in terms):
            raise QueryError(f"'in' in --where takes constants only, not {self._snippet(right)!r}.")
        try:
            value_set = pa.array([t.const for t in terms], type=left.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            raise QueryError(f"the values {self._snippet(right)!r} do not match the type {left.type} "
                             "of the left side of 'in' in --where.") from None
        out = left.expr.isin(value_set)
        return pc.invert(out) if isinstance(op, ast.NotIn) else out

    def visit_Call(self, node: ast.Call) -> _Term:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            raise QueryError(f"function '{name or self._snippet(node.func)}' is not allowed in "
                             f"--where; allowed functions: {', '.join(FUNCTIONS)}.")
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise QueryError(f"{name}() in --where takes exactly one argument ({self._snippet(node)!r}).")
        t = self.visit(node.args[0])
        if name == "abs":
            self._require(t, _NUM, "abs()", node.args[0])
            return _Term(pc.abs(t.expr), t.type)
        if name == "isnan":
            self._require(t, ("float",), "isnan()", node.args[0])
            return _Term(pc.is_nan(t.expr), pa.bool_())
        return _Term(pc.is_null(t.expr, nan_is_null=True), pa.bool_())  # missing or NaN, as pandas


def _arith_type(a: _Term, b: _Term) -> pa.DataType | None:
    """Approximate result type of + - * /: the column's type wins over a literal's."""
    if a.is_const or b.is_const or a.type is None or b.type is None:
        return b.type if a.is_const else a.type if b.is_const else None
    floats = [t for t in (a.type, b.type) if _kind(t) == "float"]
    return max(floats, key=lambda t: t.bit_width) if floats else pa.int64()


def parse_where(expr: str, columns: Sequence[str] | pa.Schema) -> pc.Expression:
    """Translate a ``--where`` string into an Arrow filter expression, without evaluating it.

    ``columns`` is the list of column names, or a :class:`pyarrow.Schema` (then types are checked
    too and numeric literals compared with float32 columns are cast to float32, as numpy does).
    Raises :class:`QueryError` for syntax errors, unknown columns and any construct outside the
    small grammar: columns, constants, comparisons, and/or/not, & | ~, + - * /, abs, isnan,
    isnull and ``x in (a, b)``.
    """
    schema = columns if isinstance(columns, pa.Schema) else None
    names, types = list(schema.names if schema else columns), {f.name: f.type for f in schema or []}
    if not isinstance(expr, str) or not expr.strip():
        raise QueryError("the --where expression is empty.")
    source = expr.strip()
    try:
        term = _Translator(source, names, types).visit(ast.parse(source, mode="eval").body)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes on some Pythons
        raise QueryError(f"could not parse --where expression {expr!r}: {getattr(e, 'msg', e)}.") from None
    except (RecursionError, MemoryError):
        raise QueryError(f"the --where expression {expr!r} is too deeply nested.") from None
    if _kind(term.type) not in ("bool", "unknown"):
        raise QueryError(f"--where must be a condition (true or false per row), but {expr!r} is a "
                         f"{term.type} value; compare it, e.g. {source} > 0.")
    return term.expr


def _names(expr: str) -> set[str]:
    """Column names a (valid) ``--where`` expression refers to."""
    return {n.id for n in ast.walk(ast.parse(expr.strip(), mode="eval")) if isinstance(n, ast.Name)}


def _validate_cone(cone: Sequence[float]) -> tuple[float, float, float]:
    try:
        ra, dec, radius = (float(x) for x in cone)
    except (TypeError, ValueError):
        raise QueryError("a cone is three numbers in degrees: ra, dec, radius, e.g. --cone 150.1 2.2 0.5.") from None
    problem = ("is not three finite numbers" if not all(map(math.isfinite, (ra, dec, radius))) else
               f"has right ascension {ra:g} deg outside [-360, 360]" if not -360.0 <= ra <= 360.0 else
               f"has declination {dec:g} deg outside [-90, 90]" if not -90.0 <= dec <= 90.0 else
               f"has radius {radius:g} deg outside (0, 180] (the radius is in degrees, not arcsec)"
               if not 0.0 < radius <= 180.0 else None)
    if problem:
        raise QueryError(f"the cone ({ra:g}, {dec:g}, {radius:g}) {problem}.")
    return ra % 360.0, dec, radius


@dataclass(frozen=True)
class CleanSelection:
    """The clean sample (``--clean``): stars whose labels can be used without further cuts.

    A star is clean when (1) no bit of :class:`distlabels.fit.Flag` is set in ``flags`` (fitted,
    converged, inside the model's label box, RV inside the search range, S/N and chi^2 not
    flagged by the kernel), (2) ``ingest_flags == 0`` where the catalog has that column, (3) S/N
    per pixel >= ``min_snr`` and (4) reduced chi^2 <= ``max_chi2_red``: stricter than the
    kernel's own LOW_SNR / CHI2_HIGH flags, which mark fits that are unusable rather than merely
    imprecise. Rows with NaN S/N or chi^2 are not clean.
    """

    min_snr: float = 20.0
    max_chi2_red: float = 3.0

    @staticmethod
    def reject_bits() -> int:
        """Every flag bit the kernel defines (read from the Flag enum, never hard-coded)."""
        from distlabels.fit.flags import Flag

        return int(functools.reduce(operator.or_, (int(f) for f in Flag), 0))

    def where(self, columns: Sequence[str]) -> str:
        """The selection as a ``--where`` expression over a catalog with ``columns``."""
        missing = [c for c in ("flags", "snr", "chi2_red") if c not in columns]
        if missing:
            raise QueryError(f"--clean needs the column(s) {', '.join(missing)}, which this catalog lacks.")
        parts = [f"flags & {self.reject_bits()} == 0"]
        if "ingest_flags" in columns:
            parts.append("ingest_flags == 0")
        parts += [f"snr >= {float(self.min_snr)!r}", f"chi2_red <= {float(self.max_chi2_red)!r}"]
        return " and ".join(parts)


CLEAN = CleanSelection()


class Catalog:
    """A label catalog on disk (see :mod:`distlabels.paths` for the layout); read-only.

    filesystem: a :class:`pyarrow.fs.FileSystem` through which fragment files are opened (the
    local one by default; tests wrap it to count files opened). Fragments are listed afresh by
    every query, so fragments streamed in by a running fit, or merged by ``compact``, are seen.

    engine: who scans many files (no cone, or a large one): "duckdb" runs the scan as one DuckDB
    query with a pushed-down superset of the filter, then applies the exact Arrow filter to its
    result (see :mod:`distlabels.catalog.sql`); "arrow" uses the pyarrow scanner; "auto" (default)
    is "duckdb" when the package is installed and no ``filesystem`` is given. A few files (a
    cone, a ``limit``) are always read by pyarrow. :attr:`last_engine` says who answered.
    """

    def __init__(self, root: Path, meta: dict[str, Any], filesystem: Any = None, engine: str = "auto"):
        if engine not in ENGINES:
            raise QueryError(f"unknown query engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        if engine == "duckdb" and not _sql.available():
            raise QueryError("the duckdb engine needs the duckdb package: pip install duckdb "
                             "(or distlabels[query]), or use --engine arrow.")
        if engine == "duckdb" and filesystem is not None:
            raise QueryError("the duckdb engine reads local files only; use engine='arrow' with a filesystem.")
        self.root, self._meta = root, meta
        self.filesystem = filesystem
        self.engine = engine
        self.last_engine = ""  # "duckdb", "arrow" (one scanner) or "files" (per-file readers)
        self._duck: tuple[Any, Any] | None = None  # (listing key, DuckDB connection)
        self._duck_lock = threading.Lock()
        self._n_duck_scans = 0
        self._schema: pa.Schema | None = None
        self._listing_key: int | None = None
        self.last_files_read = 0  # fragment files opened by the latest query()
        self._md_cache: dict = {}  # the dataset of dataset/_metadata, while that file is unchanged

    @property
    def meta(self) -> dict[str, Any]:
        """The catalog.json description ({} when the file is absent)."""
        return dict(self._meta)

    @property
    def fragments(self) -> list[Path]:
        """Visible Parquet fragments, sorted; hidden ('.', '_') files and folders are skipped."""
        return paths.list_fragments(self.root)

    @property
    def schema(self) -> pa.Schema:
        """Schema of the catalog: ``dataset/_common_metadata`` (all fragments' columns), else the
        first fragment's (the writer writes all alike); without key-value metadata."""
        if self._schema is None:
            common = self.root / paths.DATASET_DIR / paths.COMMON_METADATA
            src = common if common.is_file() else next(iter(self.fragments), None)
            try:
                self._schema = pq.read_schema(src).remove_metadata() if src is not None else pa.schema([])
            except (OSError, pa.ArrowInvalid) as e:
                raise StoreError(f"cannot read the schema in {src}: {e}.") from None
        return self._schema

    @property
    def columns(self) -> list[str]:
        """File column names (Norder/Dir/Npix come from directory names and are not listed)."""
        return list(self.schema.names)

    @property
    def label_names(self) -> list[str]:
        """Fitted labels: from catalog.json, else every column with a matching ``_err`` column."""
        cols = self.columns
        fallback = [c for c in cols if f"{c}_err" in cols and c != "rv"]
        return [str(n) for n in self._meta.get("label_names") or fallback]

    def _snapshot(self) -> list[Path]:
        """The visible fragments now; the schema is read again when the listing changed (a run or
        compact may have rewritten ``_common_metadata``). Files are only ever replaced by
        renames, so (path, inode) pairs tell whether the listing changed."""
        entries = paths.fragment_listing(self.root)
        key = hash(tuple(entries))
        if key != self._listing_key:
            self._schema, self._listing_key = None, key
        return [Path(p) for p, _ in entries]

    def _dataset(self, files: Sequence[Path]) -> ds.Dataset:
        return file_dataset(self.root, files, pa.unify_schemas([self.schema, _PART_SCHEMA]), self.filesystem)

    def query(self, where: str | None = None, columns: Sequence[str] | None = None,
              cone: Sequence[float] | None = None, limit: int | None = None,
              clean: bool | CleanSelection = False) -> pa.Table:
        """Rows matching ``where`` (see :func:`parse_where`) inside ``cone`` (ra, dec, radius in
        degrees), with ``columns`` (default: every file column), at most ``limit`` rows; with
        ``clean`` (True or a :class:`CleanSelection`), only the clean sample.

        Norder, Dir and Npix may be used in ``where`` and ``columns``. Only fragments in pixel
        directories that can intersect the cone are opened; the count of files opened is left in
        :attr:`last_files_read`.
        """
        for attempt in range(3):
            try:
                return self._query(where, columns, cone, limit, clean)
            except _Vanished as e:  # compact swapped the dataset tree between listing and reading
                if attempt == 2:
                    raise StoreError(f"the catalog at {self.root} kept changing while it was read "
                                     f"({e}); try again.") from None
                time.sleep(0.05 * (attempt + 1))  # the two-rename fallback leaves dataset/ away briefly
        raise AssertionError("unreachable")

    def _tree(self) -> tuple[int, int]:
        """Identity of the ``dataset/`` directory now (``compact`` swaps the whole tree)."""
        try:
            st = os.stat(self.root / paths.DATASET_DIR)
        except FileNotFoundError:
            raise _Vanished("dataset/ is being swapped by compact") from None
        return st.st_dev, st.st_ino

    def _query(self, where, columns, cone, limit, clean) -> pa.Table:
        self.last_files_read = 0
        tree = self._tree()
        files = self._snapshot()
        listed = len(files)
        schema = self.schema
        full = pa.unify_schemas([schema, _PART_SCHEMA])
        out_cols = list(schema.names) if columns is None else list(dict.fromkeys(columns))
        unknown = [c for c in out_cols if c not in full.names]
        if unknown:
            raise _unknown_column(unknown[0], schema.names, "--columns")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                                  or limit < 0):
            raise QueryError(f"--limit must be a non-negative integer, not {limit!r}.")
        filt = parse_where(where, full) if where is not None else None
        needed = set(out_cols) | (_names(where) if where is not None else set())
        clean_where = None
        if clean:
            sel = clean if isinstance(clean, CleanSelection) else CLEAN
            clean_where = sel.where(schema.names)
            cf = parse_where(clean_where, full)
            filt = cf if filt is None else pc.and_kleene(filt, cf)
            needed |= _names(clean_where)
        cone_t = _validate_cone(cone) if cone is not None else None
        band = None
        conditions = [w for w in (where, clean_where) if w is not None]
        if cone_t is not None:
            if not {"ra", "dec"} <= set(schema.names):
                raise StoreError(f"the catalog at {self.root} has no ra/dec columns for a cone search.")
            ra0, dec0, radius = cone_t
            files = self._prune(files, ra0, dec0, radius)
            # exact-safe band: a row within radius of the centre has |dec - dec0| <= radius
            band = (pc.field("dec") >= dec0 - radius) & (pc.field("dec") <= dec0 + radius)
            filt = band if filt is None else pc.and_kleene(filt, band)
            needed |= {"ra", "dec"}
            pad = 1e-6  # the SQL band compares in its own float type: never narrower than Arrow's
            conditions.append(f"dec >= {dec0 - radius - pad!r} and dec <= {dec0 + radius + pad!r}")
        if files and filt is not None and needed & set(PARTITION_COLUMNS):
            # Norder/Dir/Npix conditions drop directories unopened
            files = [Path(f.path) for f in self._dataset(files).get_fragments(filter=filt)]
        read_cols = [c for c in full.names if c in needed]
        out_schema = pa.schema([full.field(c) for c in read_cols])

        table = None
        if limit is None and len(files) >= SCAN_MIN_FILES:
            if not needed & set(PARTITION_COLUMNS):
                table = self._duckdb(files, out_schema, conditions, filt, where, full)
            if table is None:
                table = scan_dataset(self.root, files, full, out_schema, filt, band, where, self.filesystem,
                                     self._md_cache, use_metadata=len(files) == listed)
                self.last_engine = "arrow"
            self.last_files_read = len(files)
        if table is None:
            table = self._read_chunks(files, out_schema, filt, where, limit)
            self.last_engine = "files"
        if cone_t is not None and table.num_rows:  # exact cut on the rows of candidate pixels
            sep = angular_separation(table["ra"].to_numpy(), table["dec"].to_numpy(), cone_t[0], cone_t[1])
            table = table.filter(pa.array(sep <= cone_t[2]))
        if self._tree() != tree:  # compact swapped dataset/ while we read: rows may mix two trees
            raise _Vanished("the catalog was compacted while it was read")
        return (table if limit is None else table.slice(0, int(limit))).select(out_cols)

    def _duckdb(self, files: list[Path], out_schema: pa.Schema, conditions: list[str], filt: pc.Expression | None,
                where: str | None, full: pa.Schema) -> pa.Table | None:
        """The scan through DuckDB, exact-filtered by Arrow; None when the Arrow path should run."""
        if self.engine == "arrow" or self.filesystem is not None or (self.engine == "auto" and not _sql.available()):
            return None
        pushed = _sql.prefilter_sql(conditions, full)
        if pushed is None:  # nothing to push down: DuckDB would only be a slower reader
            return None
        try:
            table = _sql.duckdb_scan(self._duck_session(), files, out_schema, pushed)
        except FileNotFoundError as e:
            raise _Vanished(str(e)) from None
        except _sql.DuckDBFailed:
            return None  # e.g. fragments of an older schema: the Arrow path casts them
        self.last_engine = "duckdb"
        # DuckDB returns one small chunk per file; one filter call over many chunks costs ~10x more
        return table if filt is None else apply_filter(table.combine_chunks(), filt, where, self.root)

    def _duck_session(self) -> Any:
        """The DuckDB database for this scan: the process's shared one for this catalog's first
        scan, then the catalog's own with a Parquet metadata cache (new when the listing of
        fragments changed since it was made, or the thread count did)."""
        key = (self._listing_key, pa.cpu_count())
        with self._duck_lock:
            self._n_duck_scans += 1
            if self._n_duck_scans == 1:  # a one-off query (the CLI, a fresh object) needs no cache
                return _sql.shared(pa.cpu_count())
            if self._duck is None or self._duck[0] != key:  # the old one goes with its last cursor
                self._duck = (key, _sql.connect(pa.cpu_count()))
            return self._duck[1]

    def _read_chunks(self, files: list[Path], out_schema: pa.Schema, filt: pc.Expression | None,
                     where: str | None, limit: int | None) -> pa.Table:
        """Per-file readers on threads, for a few files or a ``limit`` (stops opening files early)."""
        tables = [out_schema.empty_table()]
        n_rows, done = 0, 0
        workers = max(1, min(pa.cpu_count(), len(files)))
        # files go to the threads in chunks (one filter per chunk, not per small file); with a
        # limit, a few chunks at a time so that opening files stops early
        chunk = max(1, min(_CHUNK_FILES if limit is None else 8, -(-len(files) // workers)))
        step = len(files) if limit is None else chunk * workers
        with ThreadPoolExecutor(workers) as pool:
            while done < len(files) and (limit is None or n_rows < limit):
                batch = files[done:done + step]
                parts = [batch[i:i + chunk] for i in range(0, len(batch), chunk)]
                for t in pool.map(lambda fs: read_files(self.root, fs, out_schema, filt, where, self.filesystem),
                                  parts):
                    tables.append(t)
                    n_rows += t.num_rows
                done = self.last_files_read = done + len(batch)
        return pa.concat_tables(tables)

    def _prune(self, files: list[Path], ra: float, dec: float, radius: float) -> list[Path]:
        """Fragments whose pixel directory may intersect the cone (unparsable paths are kept)."""
        keys: list[tuple[int, int] | None] = []
        for f in files:
            try:
                keys.append(paths.parse_pixel_dir(f.relative_to(self.root)))
            except ValueError:
                keys.append(None)
        keep = pixels_touching_cone({k for k in keys if k is not None}, ra, dec, radius)
        return [f for f, k in zip(files, keys) if k is None or k in keep]


def open_catalog(path: str | os.PathLike, *, filesystem: Any = None, engine: str = "auto") -> Catalog:
    """Open the catalog at ``path``; StoreError if it is missing or has no dataset/ directory.

    filesystem: optional :class:`pyarrow.fs.FileSystem` used to open fragment files;
    engine: "auto", "duckdb" or "arrow", who runs full scans (see :class:`Catalog`).
    """
    root = Path(path)
    if not root.exists():
        raise StoreError(f"catalog {str(root)!r} does not exist.")
    if not (root / paths.DATASET_DIR).is_dir():
        raise StoreError(f"{str(root)!r} is not a label catalog: it has no {paths.DATASET_DIR}/ directory.")
    meta_path = root / paths.CATALOG_META
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {meta_path}: {e}.") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_path} is not a JSON object.")
    return Catalog(root, meta, filesystem, engine)


def _pylist(col: pa.ChunkedArray) -> list[Any]:
    """Python values; float32 by its shortest repr (5000.1, not 5000.10009765625), NaN as None."""
    if not pa.types.is_floating(col.type):
        return col.to_pylist()
    short = col.type.bit_width <= 32
    return [None if v is None or not math.isfinite(v) else float(str(np.float32(v))) if short else v
            for v in col.to_pylist()]


def _text_table(table: pa.Table, max_rows: int) -> str:
    head, cols = table.slice(0, max_rows), []
    for field in table.schema:
        raw = head.column(field.name).to_pylist()
        cells = ["" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in raw]
        width = max([len(field.name)] + [len(c) for c in cells])
        just = str.rjust if pa.types.is_integer(field.type) or pa.types.is_floating(field.type) else str.ljust
        cols.append([just(field.name, width), "-" * width] + [just(c, width) for c in cells])
    n = table.num_rows
    footer = f"({n:,} row{'' if n == 1 else 's'})" if n <= max_rows else f"({max_rows:,} of {n:,} rows shown)"
    return "\n".join(["  ".join(parts).rstrip() for parts in zip(*cols)] + [footer]) + "\n"


_FITS_CARDS = (("DLMODEL", "model_id", "distlabels model id"), ("DLMODSHA", "model_sha256", "model weights sha256"),
               ("DLVERS", "distlabels_version", "distlabels code version"), ("DLSTORE", "store", "input spectra store"))


def _fits_bytes(table: pa.Table, provenance: dict[str, Any] | None) -> bytes:
    """A FITS file (empty primary HDU + one BINTABLE) of ``table``, with units and provenance.

    Floats keep NaN for missing values; integer columns with nulls become masked (TNULL);
    strings are fixed-width ASCII/UTF-8 bytes; fixed-length list columns become array cells.
    """
    from astropy.io import fits
    from astropy.table import MaskedColumn, Table

    from .columns import unit

    cols = {}
    for field in table.schema:
        col = table.column(field.name)
        t = field.type
        if pa.types.is_floating(t):
            data = col.cast(pa.float64() if t.bit_width > 32 else pa.float32()).fill_null(np.nan)
            cols[field.name] = data.to_numpy()
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            values = col.to_numpy(zero_copy_only=False) if col.null_count == 0 else None
            if values is None:
                mask = col.is_null().to_numpy(zero_copy_only=False)
                values = MaskedColumn(col.fill_null(0).to_numpy(zero_copy_only=False), mask=mask)
            cols[field.name] = values
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            cols[field.name] = np.array(["" if v is None else v for v in col.to_pylist()], dtype=str)
        elif pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if len(lengths) and (np.any(lengths != lengths[0]) or col.null_count):
                raise QueryError(f"column '{field.name}' holds lists of different lengths, which FITS "
                                 "cannot store as a table column; leave it out with --columns.")
            n = int(lengths[0]) if len(lengths) else 0
            flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            cols[field.name] = np.asarray(flat).reshape(len(col), n)
        else:
            raise QueryError(f"column '{field.name}' of type {t} cannot be written to FITS; leave it out with --columns.")
    tab = Table(cols) if cols else Table()
    hdu = fits.table_to_hdu(tab)
    hdu.name = "CATALOG"
    # TUNITn written as plain strings: 'dex' is not a FITS-standard unit, so astropy's unit
    # machinery would drop it, but TOPCAT and astropy show it as written
    for i, name in enumerate(tab.colnames, start=1):
        u = unit(name)
        if u:
            hdu.header[f"TUNIT{i}"] = u
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = "distlabels"
    for key, src, comment in _FITS_CARDS:
        value = (provenance or {}).get(src)
        if value is not None:
            value = str(value)  # long values (paths) use the CONTINUE convention, without comment
            primary.header[key] = (value, comment) if len(value) + len(comment) < 60 else value
    buf = io.BytesIO()
    fits.HDUList([primary, hdu]).writeto(buf)
    return buf.getvalue()


def format_table(table: pa.Table, fmt: str = "table", out: str | os.PathLike | None = None,
                 *, max_rows: int = 20, provenance: dict[str, Any] | None = None) -> str | None:
    """Render a query result as "table" (aligned text, first ``max_rows`` rows and a row-count
    footer), "csv", "json" (array of records, NaN as null), "parquet" or "fits" (a FITS binary
    table with units, for TOPCAT and astropy; both need ``out``).

    provenance: the catalog's provenance (model id and sha256, code version, store), stored in
    the Parquet key-value metadata or the FITS primary header. Returns the text when ``out`` is
    None (the caller prints it); otherwise writes ``out`` atomically (hidden temporary sibling,
    then rename) and returns None.
    """
    fmt = str(fmt).lower()
    if fmt not in ("table", "csv", "json", "parquet", "fits"):
        raise QueryError(f"unknown output format {fmt!r}; use table, csv, json, parquet or fits.")
    if fmt in ("parquet", "fits") and out is None:
        raise QueryError(f"--format {fmt} needs an output file (--out PATH).")
    buf = io.BytesIO()
    if fmt == "parquet":
        if provenance:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   b"distlabels": json.dumps(provenance, default=str).encode()})
        pq.write_table(table, buf)
    elif fmt == "fits":
        buf.write(_fits_bytes(table, provenance))
    elif fmt == "csv":
        import pyarrow.csv as pcsv
        pcsv.write_csv(table, buf)
    elif fmt == "json":
        cols = {name: _pylist(table.column(name)) for name in table.column_names}
        buf.write(json.dumps([dict(zip(cols, r)) for r in zip(*cols.values())], default=str).encode() + b"\n")
    else:
        buf.write(_text_table(table, max_rows).encode())
    if out is None:
        return buf.getvalue().decode()
    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    paths.temp_path(final).write_bytes(buf.getvalue())
    os.replace(paths.temp_path(final), final)  # readers never see a half-written file
    return None
