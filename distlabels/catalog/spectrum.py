"""One star's observed spectrum with its best-fit model and residuals (``plot ... residuals``).

The catalog stores labels and RV but not the continuum coefficients (they depend on the
continuum basis and would add ~12 columns per star). The continuum is re-solved instead: the
model is linear in the continuum coefficients, ``model = sum_k c_k * M_k`` with
``M_k = SpectrumFitter.model_flux(labels, rv, e_k)``, so at the catalog's labels and RV the
coefficients follow from one weighted linear least-squares solve. At a converged fit this is
exactly the fit's own continuum (the chi^2 gradient in the linear parameters is zero there), so
no refit of the star is needed and the plot shows the catalog's solution, not a new one. The
recomputed reduced chi^2 is printed next to the catalog's.

Inputs: the spectra store and the model recorded in the catalog's provenance (``store``,
``model_path``), or given explicitly; a model whose weights' sha256 differs from the one the
catalog was fitted with is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from .. import paths
from ..config import FitConfig
from ..errors import DistlabelsError, QueryError, StoreError
from .columns import axis_label
from .query import Catalog

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["StarSpectrum", "load_star_spectrum", "residuals_plot"]

C_KMS = 299_792.458


@dataclass
class StarSpectrum:
    """A star's data and best-fit model on the store's pixels (all arrays (n_pix,))."""

    source_id: str
    wavelength_aa: np.ndarray          # store grid, in ``wavelength_medium``
    wavelength_medium: str
    flux: np.ndarray
    ivar: np.ndarray
    used: np.ndarray                   # bool: pixels the fit could use (finite, ivar > 0, unmasked, covered)
    model: np.ndarray | None           # None when the star was not fitted
    continuum_coeffs: np.ndarray | None
    chi2_red: float                    # recomputed from flux, ivar and model on the used pixels
    row: dict[str, Any]                # the catalog row


def _fit_config(prov: dict[str, Any]) -> FitConfig:
    known = {f.name for f in fields(FitConfig)}
    data = {k: v for k, v in (prov.get("fit_config") or {}).items() if k in known}
    if "fix" in data:
        data["fix"] = tuple((str(a), float(b)) for a, b in (data["fix"] or []))
    return FitConfig(**data)


def _store_row(store, source_id: str, hp29: int | None):
    """The store row of ``source_id``, reading only the store pixel that holds it when known."""
    files = store.fragments
    order = store.meta.get("hats_order")
    if hp29 is not None and order is not None:
        pix = int(hp29) >> (2 * (paths.HEALPIX_ORDER - int(order)))
        files = [f for f in files if paths.parse_pixel_dir(f.relative_to(store.root)) == (int(order), pix)] or files
    t = ds.dataset([str(f) for f in files], format="parquet").to_table(filter=pc.field("source_id") == source_id)
    if t.num_rows == 0:
        raise StoreError(f"source_id {source_id!r} is in the catalog but not in the spectra store {store.root}.")
    return t.slice(0, 1)


def load_star_spectrum(catalog: Catalog, source_id: str, *, spectra: str | os.PathLike | None = None,
                       model: str | os.PathLike | None = None, device: str = "cpu") -> StarSpectrum:
    """Observed spectrum, pixel mask and best-fit model of ``source_id`` (see module docstring)."""
    from ..fit import SpectrumFitter
    from ..io.store import open_store
    from ..models import load

    sid = str(source_id)
    rows = catalog.query(where=f"source_id == {json.dumps(sid)}")
    if rows.num_rows == 0:
        raise QueryError(f"source_id {sid!r} is not in the catalog {catalog.root}.")
    row = {k: v[0] for k, v in rows.to_pydict().items()}
    prov = catalog.meta.get("provenance") or {}
    store_path = spectra or prov.get("store")
    if not store_path:
        raise DistlabelsError("the catalog does not record its spectra store; pass --spectra STORE.")
    if not Path(store_path).exists():
        raise StoreError(f"the spectra store {store_path} does not exist; pass --spectra STORE.")
    model_path = model or prov.get("model_path")
    if not model_path or not Path(model_path).exists():
        raise DistlabelsError(f"the model {model_path or '(not recorded)'} of this catalog is not available; "
                              "pass --model MODEL_DIR.")
    store = open_store(store_path)
    emu = load(model_path)
    want = prov.get("model_sha256")
    if want and emu.meta.get("weights_sha256") and emu.meta["weights_sha256"] != want:
        raise DistlabelsError(f"the model at {model_path} (sha256 {emu.meta['weights_sha256'][:12]}...) is not the "
                              f"one this catalog was fitted with (sha256 {want[:12]}...).")
    srow = _store_row(store, sid, row.get(paths.HEALPIX_COLUMN))
    flux, ivar, mask = (a[0] if a is not None else None for a in store.spectra(srow))
    used = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    if mask is not None:
        used &= ~mask

    labels = np.array([row.get(n, np.nan) for n in emu.label_names], np.float64)
    rv = row.get("rv")
    rv = float("nan") if rv is None else float(rv)
    if not (np.all(np.isfinite(labels)) and np.isfinite(rv)):
        return StarSpectrum(sid, store.wavelength, store.wavelength_medium, flux, ivar, used, None, None,
                            float("nan"), row)
    cfg = _fit_config(prov)
    fitter = SpectrumFitter(emu, store.wavelength, wavelength_medium=store.wavelength_medium,
                            resolution=store.resolution, segments=store.segments, config=cfg, device=device)
    # pixels the model covers at this RV (the fit gives the others no weight)
    from ..io.wavelength import to_vacuum

    lam_rest = to_vacuum(store.wavelength, store.wavelength_medium) * np.sqrt((1 - rv / C_KMS) / (1 + rv / C_KMS))
    lam_mod = to_vacuum(emu.wavelength, emu.wavelength_medium)
    used &= (lam_rest > lam_mod.min()) & (lam_rest < lam_mod.max())
    used &= fitter.usable.cpu().numpy()               # the fit's masks (tellurics, sky, ISM) and segments
    n_cont = int(fitter.n_cont)
    basis_models = fitter.model_flux(np.repeat(labels[None], n_cont, 0), np.full(n_cont, rv), np.eye(n_cont))
    used &= np.all(np.isfinite(basis_models), axis=0)
    if cfg.continuum_degree < 0:  # pre-normalised spectra: no continuum, the model as it is
        coeffs, model_flux = None, basis_models[0]
    else:
        a = basis_models[:, used]                        # (n_cont, n_used)
        w = ivar[used].astype(np.float64)
        lhs = (a * w) @ a.T
        rhs = (a * w) @ flux[used].astype(np.float64)
        # continuum segments without a usable pixel have a zero row: pin their coefficients
        empty = np.diag(lhs) <= 0
        lhs[empty, empty] = 1.0
        coeffs = np.linalg.solve(lhs, rhs)
        model_flux = coeffs @ basis_models
    n_free = int(fitter.free.sum())
    r = (flux - model_flux)[used]
    chi2 = float(np.sum(r * r * ivar[used]) / max(int(used.sum()) - n_free, 1))
    return StarSpectrum(sid, store.wavelength, store.wavelength_medium, flux, ivar, used, model_flux, coeffs,
                        chi2, row)


def residuals_plot(catalog: Catalog, source_id: str, out_png: str | os.PathLike, *,
                   spectra: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                   wave_range: tuple[float, float] | None = None,
                   return_fig: bool = False) -> Path | tuple[Path, "Figure"] | tuple[Path, "Figure", StarSpectrum]:
    """Observed spectrum of ``source_id`` with its best-fit model (top) and data - model with the
    +-1 sigma noise band (bottom); pixels the fit could not use are drawn in grey. wave_range:
    (lo, hi) in Angstrom to zoom in. With ``return_fig``: (path, Figure, StarSpectrum)."""
    from matplotlib.figure import Figure

    from ..fit.flags import Flag
    from .plot import _save

    star = load_star_spectrum(catalog, source_id, spectra=spectra, model=model)
    lam = star.wavelength_aa
    sel = np.ones(len(lam), bool)
    if wave_range is not None:
        lo, hi = sorted(float(v) for v in wave_range)
        sel = (lam >= lo) & (lam <= hi)
        if not sel.any():
            raise QueryError(f"--wave-range {lo:g},{hi:g} holds none of the spectrum's pixels "
                             f"({lam.min():.0f}-{lam.max():.0f} A).")
    good, bad = sel & star.used, sel & ~star.used
    fig = Figure(figsize=(11, 5.6), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    flux_good = np.where(good, star.flux, np.nan)
    top.plot(lam, flux_good, color="k", lw=0.6, label="observed")
    if bad.any():
        top.plot(lam[bad], star.flux[bad], ".", color="0.7", ms=2, label="not used by the fit")
    sigma = np.where(star.ivar > 0, 1 / np.sqrt(np.where(star.ivar > 0, star.ivar, 1)), np.nan)
    if star.model is not None:
        top.plot(lam, np.where(sel, star.model, np.nan), color="tab:red", lw=0.8, label="best-fit model")
        resid = np.where(good, star.flux - star.model, np.nan)
        bottom.fill_between(lam, -np.where(good, sigma, np.nan), np.where(good, sigma, np.nan), color="tab:blue",
                            alpha=0.35, lw=0, zorder=3, label="±1σ noise")
        bottom.plot(lam, resid, color="k", lw=0.5)
        bottom.axhline(0, color="tab:red", lw=0.8)
        finite = resid[np.isfinite(resid)]
        if finite.size:
            lim = max(float(np.percentile(np.abs(finite), 99.5)) * 1.2, 1e-6)
            bottom.set_ylim(-lim, lim)
        bottom.legend(loc="upper right", fontsize=8)
    else:
        bottom.text(0.5, 0.5, "not fitted: no model", transform=bottom.transAxes, ha="center", va="center")
    vals = flux_good[np.isfinite(flux_good)]
    if vals.size:
        lo_f, hi_f = np.percentile(vals, [0.5, 99.5])
        pad = 0.08 * (hi_f - lo_f or 1.0)
        top.set_ylim(lo_f - pad, hi_f + pad)
    top.set_xlim(lam[sel].min(), lam[sel].max())
    top.set_ylabel("flux [store units]")
    bottom.set_ylabel("data - model")
    bottom.set_xlabel(f"{star.wavelength_medium} wavelength [Å]")
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.2)
    bottom.grid(alpha=0.2)
    r = star.row
    flags = int(r.get("flags") or 0)

    def fmt(name: str, spec: str) -> str:
        v, e = r.get(name), r.get(f"{name}_err")
        if v is None or not np.isfinite(v):
            return f"{axis_label(name).split(' [')[0]} = n/a"
        err = f" ± {e:{spec}}" if e is not None and np.isfinite(e) else ""
        return f"{axis_label(name).split(' [')[0]} = {v:{spec}}{err}"

    parts = [fmt("teff", ".0f") + " K", fmt("logg", ".2f"), fmt("mh", ".2f"), fmt("rv", ".1f") + " km/s"]
    chi_cat = r.get("chi2_red")
    chi_txt = (f"χ²_red = {star.chi2_red:.2f} (catalog {chi_cat:.2f})" if star.model is not None and chi_cat is not None
               else "")
    flag_txt = f"flags: {'|'.join(Flag.describe(flags)) or flags}" if flags else "flags: 0"
    top.set_title(f"{star.source_id}: " + ", ".join(parts) + f"\n{chi_txt}  {flag_txt}", fontsize=10)
    path = _save(fig, out_png)
    return (path, fig, star) if return_fig else path
