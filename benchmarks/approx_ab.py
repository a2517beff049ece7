"""Approximate curvature on / off, same mocks, one thread: ms per star and LM iterations by fit setting.

    flock /tmp/distlabels-cpu.lock python benchmarks/approx_ab.py --model-dir DIR --grid lamost --snr 20,50,100

For each S/N it makes ``--n`` pre-normalised mocks (|RV| < 5 km/s) and fits them with
``FitConfig.approx_curvature`` true and false under four settings: pre-normalised, default masks only,
continuum only, continuum + masks. Used to choose ``approx_curvature: auto`` (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distlabels.config import FitConfig, MockConfig  # noqa: E402
from distlabels.fit import SpectrumFitter  # noqa: E402
from distlabels.io.store import list_to_numpy  # noqa: E402
from distlabels.mock import make_mock  # noqa: E402
from distlabels.models import load  # noqa: E402

SETTINGS = {"prenorm": dict(continuum_degree=-1, masks="none"), "masks": dict(continuum_degree=-1),
            "continuum": dict(masks="none"), "full": {}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="an imported bossbrain model directory")
    ap.add_argument("--grid", default="lamost", help="lamost or model (default lamost)")
    ap.add_argument("--snr", default="20,50,100", help="S/N per pixel values")
    ap.add_argument("--n", type=int, default=128, help="mocks per S/N (default 128)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="of " + ", ".join(SETTINGS))
    ap.add_argument("--labels", default=None, help="fit only these labels, e.g. teff,logg,mh (default all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load(a.model_dir)
    labels = tuple(a.labels.split(",")) if a.labels else None
    for snr in (float(x) for x in a.snr.split(",")):
        table, meta = make_mock(model, MockConfig(n=a.n, snr_min=snr, snr_max=snr, seed=3, grid=a.grid,
                                                  normalized=True, rv_max_kms=5.0))
        n_pix = len(meta["wavelength_aa"])
        flux, ivar = list_to_numpy(table["flux"], n_pix), list_to_numpy(table["ivar"], n_pix)
        mask = list_to_numpy(table["mask"], n_pix, np.bool_)
        for name in a.settings.split(","):
            row = []
            for approx in (True, False):
                f = SpectrumFitter(model, meta["wavelength_aa"], wavelength_medium=meta["wavelength_medium"],
                                   resolution=meta["resolution"], segments=meta["segments"],
                                   config=FitConfig(approx_curvature=approx, labels=labels, **SETTINGS[name]))
                t0 = time.perf_counter()
                r = f.fit(flux, ivar, mask)
                row.append(((time.perf_counter() - t0) / a.n * 1e3, float(r.n_iter.mean())))
            (t_on, it_on), (t_off, it_off) = row
            print(f"[{a.grid} S/N {snr:g}] {name:10s} approx on {t_on:6.2f} ms/star ({it_on:.2f} it) | "
                  f"off {t_off:6.2f} ms/star ({it_off:.2f} it) | on/off {t_on / t_off:.2f}", flush=True)


if __name__ == "__main__":
    main()
