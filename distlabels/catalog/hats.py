"""The HATS catalog-level files of a label catalog, so that LSDB and hats open it as it is.

A catalog streams one fragment per finished task into ``dataset/Norder=K/Dir=D/Npix=N/``
directories. HATS allows a directory per pixel instead of one ``Npix=N.parquet`` file through the
property ``hats_npix_suffix=/``; readers then read every visible Parquet file of the directory
(pyarrow ignores names starting with '.' or '_'). What HATS needs besides the data, written here
at the end of each run and after ``distlabels compact``:

- ``hats.properties``: catalog name and type, row count, ra/dec/healpix columns, the npix suffix,
  largest partition, highest order, sky fraction, builder and creation date, and distlabels'
  provenance as extra ``distlabels_*`` keys (HATS keeps unknown keys);
- ``partition_info.csv``: the (Norder, Npix) of every pixel directory;
- ``dataset/_common_metadata``: the Arrow schema, with the provenance in its key-value metadata;
- ``dataset/_metadata``: every fragment's footer (row groups, statistics) with its relative path.

No ``point_map.fits`` or ``skymap.fits`` is written: both are optional (hats reads a MOC from
``point_map.fits`` only if present; skymaps are read only on request). Each file is written to a
hidden temporary name and renamed, so a reader sees the old file or the new one, never a part.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, paths
from ..errors import StoreError

__all__ = ["CatalogScan", "scan_catalog", "write_hats_files", "read_properties", "properties_text"]

PROVENANCE_KEY = b"distlabels"            # fragment and _common_metadata key-value metadata (JSON)
CATALOG_META_KEY = b"distlabels_catalog"  # _common_metadata only: the catalog.json description


@dataclass
class FragmentInfo:
    path: Path
    norder: int
    npix: int
    n_rows: int
    n_bytes: int
    metadata: pq.FileMetaData


@dataclass
class CatalogScan:
    """What the catalog's fragment files hold, from their footers (no data is read)."""

    root: Path
    fragments: list[FragmentInfo] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return sum(f.n_rows for f in self.fragments)

    @property
    def n_bytes(self) -> int:
        return sum(f.n_bytes for f in self.fragments)

    @property
    def pixel_rows(self) -> dict[tuple[int, int], int]:
        """Rows per (Norder, Npix), sorted by order then pixel."""
        rows: dict[tuple[int, int], int] = {}
        for f in self.fragments:
            rows[(f.norder, f.npix)] = rows.get((f.norder, f.npix), 0) + f.n_rows
        return dict(sorted(rows.items()))

    @property
    def files_per_pixel(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for f in self.fragments:
            out[(f.norder, f.npix)] = out.get((f.norder, f.npix), 0) + 1
        return dict(sorted(out.items()))


def scan_catalog(root: str | os.PathLike) -> CatalogScan:
    """Read the footer of every visible fragment under ``root/dataset``."""
    root = Path(root)
    scan = CatalogScan(root)
    for f in paths.list_fragments(root):
        norder, npix = paths.parse_pixel_dir(f.relative_to(root))
        try:
            md = pq.read_metadata(f)
        except (OSError, pa.ArrowInvalid) as e:
            raise StoreError(f"cannot read the Parquet footer of {f}: {e}.") from None
        scan.fragments.append(FragmentInfo(f, norder, npix, md.num_rows, f.stat().st_size, md))
    return scan


def _escape(value: str) -> str:
    """A Java-properties value: backslash, newline and a leading space escaped (hats reads it back)."""
    s = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return "\\" + s if s.startswith(" ") else s


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def properties_text(props: dict[str, Any]) -> str:
    """``key=value`` lines of a Java-style properties file (None values left out)."""
    lines = ["#HATS catalog (written by distlabels)"]
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        lines.append(f"{key}={_escape(str(value))}")
    return "\n".join(lines) + "\n"


def read_properties(root: str | os.PathLike) -> dict[str, str]:
    """The key=value pairs of ``root/hats.properties`` ({} when absent)."""
    path = Path(root) / paths.HATS_PROPERTIES
    if not path.is_file():
        return {}
    props: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = _unescape(value.strip())
    return props


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = paths.temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _round_sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def config_sha256(fit_config: Any) -> str | None:
    """sha256 of the canonical JSON of a run's fit configuration (None when unknown)."""
    if fit_config is None:
        return None
    return hashlib.sha256(json.dumps(fit_config, sort_keys=True, default=str).encode()).hexdigest()


def hats_properties(root: Path, scan: CatalogScan, meta: dict[str, Any]) -> dict[str, Any]:
    """The key/value pairs of hats.properties for ``scan`` and the catalog description ``meta``."""
    prov = meta.get("provenance") or {}
    pixel_rows = scan.pixel_rows
    orders = [k for k, _ in pixel_rows]
    sky = sum(1.0 / (12 * 4**k) for k in orders)
    previous = read_properties(root)
    labels = meta.get("label_names") or []
    model = prov.get("model_id") or meta.get("model_id")
    return {
        "obs_collection": meta.get("catalog_name") or root.resolve().name,
        "dataproduct_type": "object",
        "hats_nrows": scan.n_rows,
        "hats_col_ra": "ra",
        "hats_col_dec": "dec",
        "hats_col_healpix": paths.HEALPIX_COLUMN,
        "hats_col_healpix_order": paths.HEALPIX_ORDER,
        "hats_npix_suffix": "/",
        "hats_max_rows": max(pixel_rows.values()) if pixel_rows else 0,
        "hats_order": max(orders) if orders else 0,
        "moc_sky_fraction": _round_sig(sky),
        "hats_estsize": max(1, round(scan.n_bytes / 1024)),
        "hats_builder": f"distlabels v{__version__}",
        "hats_creation_date": previous.get("hats_creation_date")
        or time.strftime("%Y-%m-%dT%H:%MUTC", time.gmtime()),
        "hats_version": "v1.0",
        "obs_description": f"Stellar labels ({len(labels)} labels, radial velocity, errors and flags) fitted by "
                           f"distlabels with model {model}" if model else "Stellar labels fitted by distlabels",
        "prov_progenitor": prov.get("store"),
        "distlabels_version": prov.get("distlabels_version") or __version__,
        "distlabels_model_id": model,
        "distlabels_model_sha256": prov.get("model_sha256"),
        "distlabels_config_sha256": config_sha256(prov.get("fit_config")),
        "distlabels_input_store": prov.get("store"),
        "distlabels_label_names": labels or None,
        "distlabels_updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _strip(schema: pa.Schema) -> pa.Schema:
    return schema.remove_metadata()


def write_hats_files(root: str | os.PathLike, meta: dict[str, Any], scan: CatalogScan | None = None) -> dict[str, Any]:
    """Write (or rewrite) the HATS catalog-level files of the catalog at ``root``.

    meta: the catalog description (``label_names``, ``model_id``, ``provenance``, ...; see
    :func:`distlabels.catalog.writer.write_catalog_meta`). Returns counts for catalog.json. With
    no fragment at all, the HATS files are removed (an empty catalog is not a HATS catalog).
    """
    root = Path(root)
    scan = scan or scan_catalog(root)
    dataset = root / paths.DATASET_DIR
    targets = [root / paths.HATS_PROPERTIES, root / paths.PARTITION_INFO,
               dataset / paths.COMMON_METADATA, dataset / paths.PARQUET_METADATA]
    if not scan.fragments:
        for t in targets:
            t.unlink(missing_ok=True)
        return {"n_rows": 0, "n_fragments": 0, "n_pixels": 0, "hats": False}
    schemas = [_strip(f.metadata.schema.to_arrow_schema()) for f in scan.fragments]
    same = all(s.equals(schemas[0]) for s in schemas[1:])
    schema = schemas[0] if same else pa.unify_schemas(schemas, promote_options="permissive")
    prov = meta.get("provenance") or {}
    schema = schema.with_metadata({PROVENANCE_KEY: json.dumps(prov, default=str).encode(),
                                   CATALOG_META_KEY: json.dumps(meta, default=str).encode()})

    pixel_rows = scan.pixel_rows
    csv = "Norder,Npix\n" + "".join(f"{k},{n}\n" for k, n in pixel_rows)
    _atomic_write_bytes(root / paths.PARTITION_INFO, csv.encode())

    tmp = paths.temp_path(dataset / paths.COMMON_METADATA)
    pq.write_metadata(schema, tmp)
    os.replace(tmp, dataset / paths.COMMON_METADATA)
    if same:
        # _metadata: every footer with its path relative to dataset/, in pixel order
        collector = []
        for f in sorted(scan.fragments, key=lambda f: (f.norder, f.npix, f.path.name)):
            f.metadata.set_file_path(f.path.relative_to(dataset).as_posix())
            collector.append(f.metadata)
        tmp = paths.temp_path(dataset / paths.PARQUET_METADATA)
        pq.write_metadata(schema, tmp, metadata_collector=collector)
        os.replace(tmp, dataset / paths.PARQUET_METADATA)
    else:  # footers of different schemas cannot be combined; a stale _metadata would mislead
        (dataset / paths.PARQUET_METADATA).unlink(missing_ok=True)

    props = hats_properties(root, scan, meta)
    _atomic_write_bytes(root / paths.HATS_PROPERTIES, properties_text(props).encode("utf-8"))
    return {"n_rows": scan.n_rows, "n_fragments": len(scan.fragments), "n_pixels": len(pixel_rows),
            "healpix_order": props["hats_order"], "hats_max_rows": props["hats_max_rows"],
            "moc_sky_fraction": props["moc_sky_fraction"], "parquet_metadata": same, "hats": True}
