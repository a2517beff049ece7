"""How closely CUDA fits follow CPU fits, star by star, for each way of doing the Doppler taps.

    python benchmarks/gpu_agree.py --model-dir DIR [--n 48]

Fits the same LAMOST-like mocks (S/N 50, continuum fitted, converged tightly: chi2_tol 0.01) on the CPU
and on CUDA with the taps fused (torch.compile), eager (batched gathers) and legacy (per-pixel weights),
and prints per setting the label differences in units of the CPU errors and the relative differences
of the errors, with the worst stars (the check behind tests/fit/test_quality.py's CPU/CUDA test).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from gpu_profile import set_taps   # benchmarks/ is on the path when this script runs

from distlabels.config import FitConfig, MockConfig
from distlabels.fit import SpectrumFitter
from distlabels.io.store import list_to_numpy
from distlabels.mock import make_mock
from distlabels.models import load


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load(a.model_dir)
    table, meta = make_mock(model, MockConfig(n=240, snr_min=50, snr_max=50, seed=a.seed))
    table = table.slice(0, a.n)
    n_pix = len(meta["wavelength_aa"])
    flux, ivar = list_to_numpy(table["flux"], n_pix), list_to_numpy(table["ivar"], n_pix)
    mask = list_to_numpy(table["mask"], n_pix, np.bool_)
    kw = dict(wavelength_medium=meta["wavelength_medium"], resolution=meta["resolution"], segments=meta["segments"],
              config=FitConfig(chi2_tol=0.01, max_iter=60))
    cpu = SpectrumFitter(model, meta["wavelength_aa"], device="cpu", **kw).fit(flux, ivar, mask)
    for taps in ("fused", "eager", "legacy"):
        f = SpectrumFitter(model.to("cuda"), meta["wavelength_aa"], device="cuda", **kw)
        if not set_taps(f, taps, {}):
            print(f"{taps:6s}: not available here ({f.fwd.fused.reason})", flush=True)
            model.to("cpu")
            continue
        r = f.fit(flux, ivar, mask)
        model.to("cpu")
        same = (cpu.flags == r.flags) & ((cpu.labels_at_bound & 0b111) == 0)
        d = (np.abs(cpu.labels - r.labels) / cpu.errors.clip(1e-12))[:, :3]
        e = np.abs(r.errors[:, :3] / cpu.errors[:, :3] - 1)
        chi = r.chi2_red - cpu.chi2_red
        print(f"{taps:6s}: same flags {same.mean():.0%}; |label diff|/err median {np.median(d[same]):.2e} p95 "
              f"{np.percentile(d[same], 95):.3f} max {d[same].max():.3f}; |err ratio - 1| median "
              f"{np.median(e[same]):.2e} max {e[same].max():.3f} (> 2 %: {(e[same] > 0.02).any(1).sum()} stars); "
              f"chi2_red diff max {np.abs(chi[same]).max():.2e}", flush=True)
        for i in np.argsort(-e.max(1))[:4]:
            print(f"    star {i}: label diff/err {np.round(d[i], 3)}, err ratio {np.round(r.errors[i, :3] / cpu.errors[i, :3], 3)}, "
                  f"chi2_red cpu {cpu.chi2_red[i]:.4f} gpu {r.chi2_red[i]:.4f}, iters {cpu.n_iter[i]}/{r.n_iter[i]}, "
                  f"flags {cpu.flags[i]}/{r.flags[i]}")


if __name__ == "__main__":
    main()
