"""``distlabels verify``: prove a catalog holds every input star exactly once.

Reads only the ``source_id`` (and, from the catalog, ``flags``) columns of every fragment with
Arrow's multi-threaded dataset reader and answers with Arrow compute kernels (hash counts and set
membership), so it costs seconds, not a Python loop, on catalogs of millions of rows. Checks:

- every store ``source_id`` appears in the catalog exactly once (fitted or flagged): no missing
  rows, no duplicated rows, no rows the store does not have, no null ids;
- the store itself has unique ids, and the catalog was made from this version of the store;
- inputs = catalog + quarantine: quarantined inputs (``STORE/_quarantine/``, written by ingest for
  files that could not be read) are counted, must not also be in the catalog, and, when the store
  records its ingest input count (``n_inputs``), store rows + quarantined = inputs;
- on object storage, every fragment has its completion marker (no torn writes are counted).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .. import paths
from ..errors import DistlabelsError
from ..fit.flags import NOT_FITTED
from ..io.location import Location
from ..io.store import SpectraStore, open_store

N_EXAMPLES = 5


@dataclass
class VerifyReport:
    catalog: str
    store: str
    n_store_rows: int = 0
    n_quarantined: int = 0
    n_catalog_rows: int = 0
    n_fitted: int = 0
    n_not_fitted: int = 0
    n_clean: int = 0
    n_missing: int = 0
    n_extra: int = 0
    n_duplicated_ids: int = 0
    n_duplicate_rows: int = 0
    n_null_ids: int = 0
    n_store_duplicates: int = 0
    n_quarantined_in_catalog: int = 0
    n_incomplete_fragments: int = 0
    n_failed_partitions: int = 0
    n_inputs_recorded: int | None = None
    store_changed: bool = False
    examples: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"catalog {self.catalog} against store {self.store}",
               f"  inputs:  {self.n_store_rows} store rows + {self.n_quarantined} quarantined"
               + (f" (ingest recorded {self.n_inputs_recorded} inputs)" if self.n_inputs_recorded is not None else ""),
               f"  catalog: {self.n_catalog_rows} rows: {self.n_fitted} fitted ({self.n_clean} with flags == 0), "
               f"{self.n_not_fitted} flagged not fitted",
               f"  missing {self.n_missing}, duplicated ids {self.n_duplicated_ids} ({self.n_duplicate_rows} extra rows), "
               f"not in store {self.n_extra}, null ids {self.n_null_ids}"]
        if self.n_failed_partitions:
            out.append(f"  {self.n_failed_partitions} partition(s) failed in the last run (see {paths.FAILURES_FILE})")
        for what, ids in self.examples.items():
            if ids:
                out.append(f"  e.g. {what}: {', '.join(ids)}")
        out.append("  OK: every input star is in the catalog exactly once" if self.ok
                   else "  FAILED: " + "; ".join(self.problems))
        return out


def _ids_table(files: list[str], filesystem, columns: dict[str, pa.DataType]) -> pa.Table:
    """The given columns of many Parquet files, read by Arrow's dataset reader (threads, no row loop)."""
    schema = pa.schema(list(columns.items()))
    if not files:
        return schema.empty_table()
    dataset = ds.dataset(files, format="parquet", filesystem=filesystem, schema=schema)
    return dataset.to_table(columns=list(columns))


def _examples(arr) -> list[str]:
    return [str(x) for x in arr.slice(0, N_EXAMPLES).to_pylist()]


def quarantine_table(store_root: Path) -> tuple[int, pa.ChunkedArray | None]:
    """(rows in ``STORE/_quarantine``, their non-null source_ids or None)."""
    qdir = Path(store_root) / paths.QUARANTINE_DIR
    files = sorted(p for p in qdir.rglob("*.parquet") if not p.name.startswith(".")) if qdir.is_dir() else []
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    with_ids = [str(f) for f in files if "source_id" in pq.ParquetFile(f).schema_arrow.names]
    if not with_ids:
        return n, None
    ids = _ids_table(with_ids, None, {"source_id": pa.string()}).column("source_id")
    return n, pc.drop_null(ids)


def verify_catalog(catalog: str, store_path: str) -> VerifyReport:
    """Check ``catalog`` against the store it was fitted from; see the module docstring."""
    store = open_store(store_path)
    loc = Location.parse(catalog)
    if not loc.exists() or not (loc.exists(paths.RUN_FILE) or loc.fragments()):
        raise DistlabelsError(f"{catalog} is not a distlabels catalog (no {paths.RUN_FILE}, no fragments).")
    rep = VerifyReport(loc.url, str(store.root))

    # Inputs: the store's ids, and the quarantine's.
    store_ids = _ids_table([str(f) for f in store.fragments], None, {"source_id": pa.string()}).column("source_id")
    rep.n_store_rows = len(store_ids)
    n_store_distinct = len(pc.value_counts(store_ids)) - (1 if store_ids.null_count else 0)
    rep.n_store_duplicates = rep.n_store_rows - store_ids.null_count - n_store_distinct
    rep.n_quarantined, q_ids = quarantine_table(store.root)
    if "n_inputs" in store.meta:
        rep.n_inputs_recorded = int(store.meta["n_inputs"])

    # The catalog's ids and flags, from complete fragments only.
    fs, to_path = loc.arrow_filesystem()
    frags = loc.fragments()
    complete = loc.completed()
    rep.n_incomplete_fragments = sum(1 for f in frags if f not in complete)
    cat = _ids_table([to_path(f) for f in frags if f in complete], fs,
                     {"source_id": pa.string(), "flags": pa.int64()})
    ids = cat.column("source_id")
    rep.n_catalog_rows = len(ids)
    rep.n_null_ids = ids.null_count
    flags = pc.fill_null(cat.column("flags"), int(NOT_FITTED))
    not_fitted = pc.not_equal(pc.bit_wise_and(flags, int(NOT_FITTED)), 0)
    rep.n_not_fitted = int(pc.sum(not_fitted).as_py() or 0)
    rep.n_fitted = rep.n_catalog_rows - rep.n_not_fitted
    rep.n_clean = int(pc.sum(pc.equal(flags, 0)).as_py() or 0)

    # One hash count of the catalog's ids and one set-membership pass of the store's; extras follow
    # from the distinct counts (catalog distinct = found + extra).
    vc = pc.value_counts(pc.drop_null(ids))
    values, counts = vc.field("values"), vc.field("counts")
    n_distinct = len(values)
    rep.n_duplicate_rows = rep.n_catalog_rows - rep.n_null_ids - n_distinct
    missing = pc.invert(pc.fill_null(pc.is_in(store_ids, value_set=values), False))
    rep.n_missing = int(pc.sum(missing).as_py() or 0)
    n_missing_distinct = len(pc.unique(pc.filter(store_ids, missing))) if rep.n_missing else 0
    rep.n_extra = n_distinct - (n_store_distinct - n_missing_distinct)
    rep.examples = {"missing": _examples(pc.filter(store_ids, missing))}
    if rep.n_duplicate_rows:
        dup = pc.greater(counts, 1)
        rep.n_duplicated_ids = int(pc.sum(dup).as_py() or 0)
        rep.examples["duplicated"] = _examples(pc.filter(values, dup))
    if rep.n_extra:
        extra = pc.invert(pc.fill_null(pc.is_in(values, value_set=store_ids), False))
        rep.examples["not in store"] = _examples(pc.filter(values, extra))
    if q_ids is not None and len(q_ids):
        both = pc.is_in(q_ids, value_set=values)
        rep.n_quarantined_in_catalog = int(pc.sum(both).as_py() or 0)
        rep.examples["quarantined and in catalog"] = _examples(pc.filter(q_ids, both))

    # Run records: which store the catalog was made from, which partitions failed.
    if loc.exists(paths.RUN_FILE):
        try:
            run = json.loads(loc.read_text(paths.RUN_FILE))
            made_from = run.get("identity", {}).get("store_manifest_sha256")
            rep.store_changed = bool(made_from) and made_from != SpectraStore.manifest_hash(store.manifest())
        except json.JSONDecodeError:
            pass
    if loc.exists(paths.FAILURES_FILE):
        with_fs = loc.parquet_file(paths.FAILURES_FILE)
        rep.n_failed_partitions = with_fs.metadata.num_rows

    p = rep.problems
    if rep.n_missing:
        p.append(f"{rep.n_missing} input source_ids are not in the catalog")
    if rep.n_duplicated_ids:
        p.append(f"{rep.n_duplicated_ids} source_ids appear more than once")
    if rep.n_extra:
        p.append(f"{rep.n_extra} catalog source_ids are not in the store")
    if rep.n_null_ids:
        p.append(f"{rep.n_null_ids} catalog rows have no source_id")
    if rep.n_store_duplicates:
        p.append(f"the store itself has {rep.n_store_duplicates} duplicated source_ids")
    if rep.n_quarantined_in_catalog:
        p.append(f"{rep.n_quarantined_in_catalog} quarantined source_ids are also in the catalog")
    if rep.n_inputs_recorded is not None and rep.n_inputs_recorded != rep.n_store_rows + rep.n_quarantined:
        p.append(f"ingest recorded {rep.n_inputs_recorded} inputs but store + quarantine hold "
                 f"{rep.n_store_rows + rep.n_quarantined}")
    if rep.n_incomplete_fragments:
        p.append(f"{rep.n_incomplete_fragments} fragments have no completion marker (torn writes)")
    if rep.store_changed:
        p.append("the store changed after the catalog was made")
    return rep


__all__ = ["VerifyReport", "quarantine_table", "verify_catalog"]
