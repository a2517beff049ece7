"""Training sets: spectra and labels from a store (optionally joined with a label table), brought
to the rest frame.

Labels come from columns of the store (``teff`` or, for mocks, ``true_teff``) or from a table
(Parquet, CSV, FITS, anything astropy reads) joined on ``source_id``, on another shared id column
(a Gaia source id), or by sky position within a tolerance in arcsec (astropy
``match_coordinates_sky``; the cross-survey case: labels from one survey, spectra from another).
Rows without a finite value for every label are dropped and counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..errors import DistlabelsError
from ..io.store import SpectraStore, open_store
from ..io.wavelength import C_KMS
from ..models.continuum import fractional_index
from ..models.resample import catmull_rom


@dataclass
class TrainingSet:
    """Spectra and labels of the training stars (n rows each)."""

    flux: np.ndarray                 # (n, n_pix) float32, observed frame
    ivar: np.ndarray                 # (n, n_pix) float32; 0 = unusable
    labels: np.ndarray               # (n, n_labels) float64, physical
    label_names: tuple[str, ...]
    source_id: np.ndarray            # (n,) str
    wavelength_aa: np.ndarray        # (n_pix,) store grid
    wavelength_medium: str
    resolution: float | None
    segments: tuple[tuple[float, float], ...] | None
    rv_kms: np.ndarray | None        # (n,) the RV to remove; None: already rest frame
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def _label_column(names: list[str], wanted: str) -> str | None:
    """The column holding label ``wanted``: itself, or ``true_<wanted>`` (mocks and grids)."""
    if wanted in names:
        return wanted
    if f"true_{wanted}" in names:
        return f"true_{wanted}"
    return None


def label_name(column: str) -> str:
    return column[5:] if column.startswith("true_") else column


def read_table(path: str | os.PathLike) -> pa.Table:
    """A label table as Arrow: Parquet natively, anything else through astropy (CSV, FITS, ECSV...)."""
    p = Path(path)
    if not p.exists():
        raise DistlabelsError(f"label table {p} does not exist.")
    if p.suffix.lower() in (".parquet", ".pq") or p.is_dir():
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise DistlabelsError(f"label table {p} is not readable Parquet ({e}).") from None
    from astropy.table import Table

    try:
        fmt = "ascii.csv" if p.suffix.lower() == ".csv" else None
        t = Table.read(p, format=fmt) if fmt else Table.read(p)
    except Exception as e:  # astropy raises many kinds for unreadable files
        raise DistlabelsError(f"label table {p} could not be read ({e.__class__.__name__}: {e}).") from None
    cols = {}
    for name in t.colnames:
        col = t[name]
        if getattr(col, "ndim", 1) != 1:
            continue
        arr = np.asarray(col.filled() if hasattr(col, "filled") else col)
        if arr.dtype.kind in "SU":
            arr = arr.astype(str)
        elif arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("="))     # FITS is big-endian; Arrow wants native
        cols[name] = pa.array(arr)
    return pa.table(cols)


def parse_join(join: str | None) -> tuple[str, float | str | None]:
    """'source_id' | 'COLUMN' | 'sky:ARCSEC' -> (kind, argument)."""
    if not join or join == "source_id":
        return "id", "source_id"
    if join.startswith("sky:"):
        try:
            tol = float(join[4:])
        except ValueError:
            raise DistlabelsError(f"--join sky:ARCSEC needs a number of arcsec, got {join!r}.") from None
        if not tol > 0:
            raise DistlabelsError("--join sky: tolerance must be positive.")
        return "sky", tol
    return "id", join


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return col.to_numpy(zero_copy_only=False) if col.null_count == 0 else \
        np.asarray(col.to_pylist(), dtype=object)


def join_labels(store_table: pa.Table, label_table: pa.Table, labels: list[str], join: str | None):
    """For every store row: label values (n, L) float64 (NaN where unmatched) and match notes."""
    kind, arg = parse_join(join)
    lcols = label_table.column_names
    picked = []
    for name in labels:
        c = _label_column(lcols, name)
        if c is None:
            raise DistlabelsError(f"label table has no column {name!r} (columns: {', '.join(lcols[:20])}).")
        picked.append(c)
    values = np.column_stack([np.asarray(_column_numpy(label_table, c), dtype=np.float64) for c in picked]) \
        if len(label_table) else np.zeros((0, len(labels)))
    n = len(store_table)
    out = np.full((n, len(labels)), np.nan)
    if kind == "id":
        key = str(arg)
        if key not in store_table.column_names:
            raise DistlabelsError(f"--join {key}: the spectra store has no column {key!r}.")
        if key not in lcols:
            raise DistlabelsError(f"--join {key}: the label table has no column {key!r}.")
        left = np.asarray(_column_numpy(store_table, key)).astype(str)
        right = np.asarray(_column_numpy(label_table, key)).astype(str)
        uniq, first = np.unique(right, return_index=True)
        if len(uniq) != len(right):
            raise DistlabelsError(f"--join {key}: the label table repeats some {key} values; each star needs one row.")
        pos = np.searchsorted(uniq, left)
        pos = np.clip(pos, 0, max(len(uniq) - 1, 0))
        hit = (len(uniq) > 0) & (uniq[pos] == left) if len(uniq) else np.zeros(n, bool)
        out[hit] = values[first[pos[hit]]]
        return out, {"join": key, "matched": int(hit.sum())}
    # Sky match: nearest label-table star within the tolerance; one label row feeds one spectrum at most.
    from astropy import units as u
    from astropy.coordinates import SkyCoord, match_coordinates_sky

    for c in ("ra", "dec"):
        if c not in lcols:
            raise DistlabelsError(f"--join sky: the label table needs 'ra' and 'dec' columns (deg); {c!r} is missing.")
    if n == 0 or len(label_table) == 0:
        return out, {"join": f"sky:{arg}", "matched": 0}
    s = SkyCoord(_column_numpy(store_table, "ra").astype(float) * u.deg,
                 _column_numpy(store_table, "dec").astype(float) * u.deg)
    t = SkyCoord(_column_numpy(label_table, "ra").astype(float) * u.deg,
                 _column_numpy(label_table, "dec").astype(float) * u.deg)
    idx, sep, _ = match_coordinates_sky(s, t)
    sep_as = sep.to(u.arcsec).value
    hit = sep_as <= float(arg)
    # Two spectra claiming one label row: keep the closer one only.
    order = np.argsort(sep_as)
    seen = set()
    for i in order:
        if not hit[i]:
            continue
        if idx[i] in seen:
            hit[i] = False
        else:
            seen.add(idx[i])
    out[hit] = values[idx[hit]]
    return out, {"join": f"sky:{arg}", "matched": int(hit.sum()), "max_sep_arcsec": float(sep_as[hit].max()) if hit.any() else None}


def load_training_set(store: str | os.PathLike | SpectraStore, labels: list[str], *, label_table=None,
                      join: str | None = None, rv_column: str | None = None) -> TrainingSet:
    """Spectra and labels of every store row with finite labels (see the module docstring).

    rv_column: the column (store or label table) with each star's RV in km/s to remove; None
    picks ``true_rv`` for a mock, nothing for a store already in the rest frame, else refuses.
    """
    st = store if isinstance(store, SpectraStore) else open_store(store)
    if not labels:
        raise DistlabelsError("give the labels to train on, e.g. --labels teff,logg,mh.")
    frags = st.fragments
    if not frags:
        raise DistlabelsError(f"spectra store {st.root} holds no spectra.")
    import pyarrow.parquet as pq

    names = pq.ParquetFile(frags[0]).schema_arrow.names
    ltab = read_table(label_table) if label_table is not None else None
    if ltab is None:        # check the label columns before reading every spectrum
        missing = [n for n in labels if _label_column(names, n) is None]
        if missing:
            avail = [c for c in names if c not in ("flux", "ivar", "mask")]
            raise DistlabelsError(f"the spectra store has no label column {missing[0]!r} (nor true_{missing[0]}); "
                                  f"columns: {', '.join(avail)}. Give --label-table FILE to join labels.")
    table = st.read_all()
    names = table.column_names
    notes: dict = {"n_store_rows": len(table)}
    if ltab is not None:
        values, info = join_labels(table, ltab, labels, join)
        notes.update(info)
    else:
        cols = []
        for name in labels:
            c = _label_column(names, name)
            if c is None:
                avail = [c for c in names if c not in ("flux", "ivar", "mask")]
                raise DistlabelsError(f"the spectra store has no label column {name!r} (nor true_{name}); columns: "
                                      f"{', '.join(avail)}. Give --label-table FILE to join labels.")
            cols.append(c)
        values = np.column_stack([np.asarray(_column_numpy(table, c), dtype=np.float64) for c in cols])
    # RV to remove.
    rv = None
    frame = st.meta.get("rv_frame", "observed")
    if rv_column is None and frame != "rest":
        if "true_rv" in names:
            rv_column = "true_rv"
        else:
            raise DistlabelsError("the store's spectra are in the observed frame; give --rv-column with each "
                                  "star's RV (km/s) so training spectra can be brought to the rest frame.")
    if rv_column is not None and rv_column not in ("none", "0"):
        if rv_column in names:
            rv = np.asarray(_column_numpy(table, rv_column), dtype=np.float64)
        elif ltab is not None and rv_column in ltab.column_names:
            rv, _ = join_labels(table, ltab, [rv_column], join)
            rv = rv[:, 0]
        else:
            raise DistlabelsError(f"--rv-column {rv_column!r} is neither a store nor a label-table column.")
        notes["rv_column"] = rv_column
    keep = np.all(np.isfinite(values), axis=1)
    if rv is not None:
        keep &= np.isfinite(rv)
    notes["n_dropped_no_labels"] = int((~keep).sum())
    if keep.sum() == 0:
        raise DistlabelsError("no store row has a finite value for every training label.")
    idx = np.flatnonzero(keep)
    sub = table.take(pa.array(idx))
    flux, ivar, mask = st.spectra(sub)
    ivar = np.where(np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0), ivar, 0).astype(np.float32)
    if mask is not None:
        ivar[mask] = 0
    return TrainingSet(flux=flux, ivar=ivar, labels=values[idx], label_names=tuple(label_name(c) for c in labels),
                       source_id=np.asarray(_column_numpy(sub, "source_id")).astype(str), wavelength_aa=st.wavelength,
                       wavelength_medium=st.wavelength_medium, resolution=st.resolution, segments=st.segments,
                       rv_kms=None if rv is None else rv[idx], notes=notes)


def doppler(rv_kms) -> np.ndarray:
    """Relativistic Doppler factor sqrt((1 + b) / (1 - b)), b = v / c."""
    b = np.asarray(rv_kms, np.float64) / C_KMS
    return np.sqrt((1 + b) / (1 - b))


def shift_to_rest(flux, ivar, wavelength_aa, rv_kms, chunk: int = 1000, nearest: bool = False):
    """Resample observed spectra onto the same grid taken as rest-frame wavelengths.

    Rest pixel k takes the observed flux at ``wavelength[k] * D(rv)`` by cubic (Catmull-Rom)
    interpolation (:mod:`distlabels.models.resample`: linear would smooth the lines); its variance
    is propagated (sum of c_a^2 var_a); a pixel whose taps include an unusable one, or that falls
    off the observed grid, gets ivar 0. ``nearest``: take the nearest pixel instead (no mixing;
    good enough to choose continuum pixels). flux, ivar: (n, n_pix);
    returns float64 torch tensors. (Interpolation correlates neighbouring pixels' noise: done only
    for the training set, which needs one common grid; the fitter shifts the model instead.)
    """
    rv = np.broadcast_to(np.asarray(rv_kms, np.float64), (len(flux),))
    if not np.any(rv != 0):
        return (torch.as_tensor(np.asarray(flux), dtype=torch.float64).clone(),
                torch.as_tensor(np.asarray(ivar), dtype=torch.float64).clone())
    outs = [_shift_block(flux[lo:lo + chunk], ivar[lo:lo + chunk], wavelength_aa, rv[lo:lo + chunk], nearest)
            for lo in range(0, len(flux), chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _shift_block(flux, ivar, wavelength_aa, rv, nearest: bool = False):
    f = torch.as_tensor(np.asarray(flux), dtype=torch.float32)
    w = torch.as_tensor(np.asarray(ivar), dtype=torch.float32)
    good = torch.isfinite(f) & torch.isfinite(w) & (w > 0)
    f = torch.where(good, f, torch.zeros_like(f))
    var = torch.where(good, 1 / torch.where(good, w, torch.ones_like(w)), torch.zeros_like(w))
    bad = (~good).to(torch.float32)
    lam = torch.as_tensor(np.asarray(wavelength_aa, np.float64))
    obs = lam[None] * torch.as_tensor(doppler(rv))[:, None]                   # (n, n_pix)
    pos = fractional_index(lam, obs)
    n, n_pix = f.shape
    if nearest:
        k = pos.round().long().clamp(0, n_pix - 1)
        inside = (pos > -0.5) & (pos < n_pix - 0.5)
        ok = inside & (bad.gather(1, k) == 0)
        return (torch.where(ok, f.gather(1, k), torch.ones_like(f)).double(),
                torch.where(ok, w.gather(1, k), torch.zeros_like(w)).double())
    kf = pos.floor().clamp(0, n_pix - 2)
    c, _ = catmull_rom((pos - kf).clamp(0, 1).to(torch.float32))
    edge = ((kf < 1) | (kf > n_pix - 3))[..., None]
    t = (pos - kf).clamp(0, 1).to(torch.float32)
    lin = torch.stack([torch.zeros_like(t), 1 - t, t, torch.zeros_like(t)], -1)
    c = torch.where(edge, lin, c)                      # linear in the outermost intervals
    k = kf.long()
    inside = (pos >= 0) & (pos <= n_pix - 1)
    out_f = torch.zeros_like(f)
    out_v = torch.zeros_like(f)
    nbad = torch.zeros_like(f)
    for a in range(4):                      # one (n, n_pix) gather per tap: no (n, n_pix, 4) temporaries
        j = (k + (a - 1)).clamp(0, n_pix - 1)
        ca = c[..., a]
        out_f.addcmul_(ca, f.gather(1, j))
        out_v.addcmul_(ca * ca, var.gather(1, j))
        # A sample with (almost) no weight in the interpolation does not spoil the pixel.
        nbad.addcmul_((ca.abs() > 1e-6).to(torch.float32), bad.gather(1, j))
    ok = inside & (nbad == 0) & (out_v > 0)
    return (torch.where(ok, out_f, torch.ones_like(out_f)).double(),
            torch.where(ok, 1 / torch.where(ok, out_v, torch.ones_like(out_v)), torch.zeros_like(out_v)).double())
