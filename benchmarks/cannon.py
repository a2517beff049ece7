"""The Cannon: distlabels against the two reference codes on the same mock data, one core each.

    python benchmarks/cannon.py --case 3            # 1,000 train / 5,000 test, teff logg mh
    python benchmarks/cannon.py --case 7 [--ho7]    # 5,000 train / 1,000 test, + cm mgm sim cam

Mock data (standing in for real stars): the bossbrain 4000-5000 K emulator (imported through the
safe unpickler) evaluated on 7,214 of its pixels (4500.0-8106.5 A, air, 0.5 A: an APOGEE-sized
spectrum), labels uniform in teff 4000-5000 K, logg 1.0-3.5, [M/H] -1.0..+0.4 (7 labels: also
[C/M], [Mg/M], [Si/M], [Ca/M] in -0.3..+0.3; every other [X/M] = 0), Gaussian noise at S/N 100
per pixel, spectra already normalised and in the rest frame (what the reference codes expect).

Codes, each given the same arrays:
  * distlabels: ``train_cannon`` (batched WLS, s^2 by maximum likelihood) and ``CannonFitter``
    (multi-start quadratic-form fast path, training-noise debiasing); "plain" = debiasing off,
    the same estimator as the references (like-for-like bias/scatter comparison).
  * annieslasso 0.2.96 (module ``thecannon``, Casey et al. 2016), with its numpy-2 fix applied at
    run time (scalar s^2 from its scatter fit; its write() is not used here).
  * thecannon 0.7.3 (module ``TheCannon``, Ho et al. 2017), its defaults (start at scaled label 1).
  * also reported: distlabels with the RV free (CCF + refinement + shifted model: the survey path)
    and with the per-label error floor measured on 20 % held-out training stars (``--error-floor``).

One core: the process is pinned to CPU 0 and every BLAS/OpenMP/torch pool to one thread before
numpy loads. The codes run interleaved (train A, B, C; then test A, B, C). Errors of the references
are reported in scaled units; they are converted to physical units for their pull figures.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"
try:
    os.sched_setaffinity(0, {0})
except (AttributeError, OSError):  # pragma: no cover - not Linux
    pass

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distlabels.config import CannonTrainConfig, FitConfig  # noqa: E402
from distlabels.fit.cannon import CannonFitter  # noqa: E402
from distlabels.train.cannon import train_cannon, training_set_from_arrays  # noqa: E402

PIX = slice(2000, 9214)          # 7,214 pixels
BOX = {"teff": (4000, 5000), "logg": (1.0, 3.5), "mh": (-1.0, 0.4)}
EXTRA = ("cm", "mgm", "sim", "cam")
CASES = {3: dict(n_train=1000, n_test=5000, labels=("teff", "logg", "mh")),
         7: dict(n_train=5000, n_test=1000, labels=("teff", "logg", "mh") + EXTRA)}


def load_emulator():
    import tempfile

    from distlabels.models import load
    from distlabels.models.importers import import_bossbrain

    d = Path(tempfile.gettempdir()) / "distlabels-bench-bb45"
    if not (d / "model.json").exists():
        import_bossbrain("4000-5000", d)
    return load(d)


def make_data(em, names, n, seed, snr):
    rng = np.random.default_rng(seed)
    lab = np.zeros((n, em.n_labels))
    for j, name in enumerate(names):
        lo, hi = BOX.get(name, (-0.3, 0.3))
        lab[:, em.label_names.index(name)] = rng.uniform(lo, hi, n)
    flux = np.concatenate([em.predict(lab[i:i + 1000])[:, PIX] for i in range(0, n, 1000)])
    flux = flux + rng.normal(0, 1 / snr, flux.shape)
    idx = [em.label_names.index(nm) for nm in names]
    return lab[:, idx], flux, np.full(flux.shape, snr**2)


def stats(fit, err, truth):
    d = fit - truth
    ok = np.all(np.isfinite(d), 1)
    out = {"n_ok": int(ok.sum()), "bias": d[ok].mean(0).tolist(), "scatter": d[ok].std(0).tolist()}
    if err is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["pull_std"] = (d[ok] / err[ok]).std(0).tolist()
            out["median_error"] = np.median(err[ok], 0).tolist()
    return out


# ------------------------------------------------------------------------------ the three codes
class Ours:
    name = "distlabels"

    def train(self, lab, flux, ivar, names, wave):
        ts = training_set_from_arrays(flux, ivar, lab, names, wave, wavelength_medium="air")
        self.model, self.report = train_cannon(ts, CannonTrainConfig(normalise="none"))

    def test(self, flux, ivar, wave, debias=True):
        f = CannonFitter(self.model, wave, wavelength_medium="air", config=FitConfig(v_max_kms=0), debias=debias)
        r = f.fit(flux.astype(np.float32), ivar.astype(np.float32))
        return r.labels, r.errors

    def test_rv_free(self, flux, ivar, wave):
        f = CannonFitter(self.model, wave, wavelength_medium="air", config=FitConfig(v_max_kms=300))
        r = f.fit(flux.astype(np.float32), ivar.astype(np.float32))
        return r.labels, r.errors, r.rv


class Casey:
    name = "annieslasso"

    def __init__(self):
        import thecannon
        import thecannon.fitting as fitting

        logging_off()
        if not getattr(fitting, "_distlabels_patched", False):
            orig = fitting.fit_pixel_fixed_scatter

            def fixed(*a, **k):                       # numpy 2: the scatter comes back as a 1-element array
                theta, s2, meta = orig(*a, **k)
                return theta, float(np.ravel(s2)[0]), meta

            fitting.fit_pixel_fixed_scatter = fixed
            fitting._distlabels_patched = True
        self.tc = thecannon

    def train(self, lab, flux, ivar, names, wave):
        vec = self.tc.vectorizer.PolynomialVectorizer(list(names), 2)
        self.model = self.tc.CannonModel(lab, flux, ivar, vec, dispersion=wave)
        self.model.train(threads=1)

    def test(self, flux, ivar, wave):
        labels, cov, _ = self.model.test(flux, ivar, threads=1)
        err = np.array([np.sqrt(np.diag(c)) if c is not None and np.ndim(c) == 2 else np.full(labels.shape[1], np.nan)
                        for c in cov])
        return np.asarray(labels, float), err * self.model._scales        # scaled -> physical


class Ho:
    name = "TheCannon (Ho)"

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")
        from TheCannon import dataset, model

        self.dataset, self.modelmod = dataset, model

    def train(self, lab, flux, ivar, names, wave):
        self.names, self.wave = list(names), wave
        self.ds = self.dataset.Dataset(wave, np.arange(len(lab)), flux.copy(), ivar.copy(), lab,
                                       np.arange(1), flux[:1].copy(), ivar[:1].copy())
        self.ds.set_label_names(self.names)
        self.model = self.modelmod.CannonModel(2, useErrors=False)
        self.model.fit(self.ds)

    def test(self, flux, ivar, wave):
        self.ds.test_flux, self.ds.test_ivar = flux.copy(), ivar.copy()
        errs, _ = self.model.infer_labels(self.ds)
        return np.asarray(self.ds.test_label_vals, float), np.asarray(errs) * self.model.scales


def logging_off():
    import logging

    logging.getLogger("thecannon").setLevel(logging.ERROR)


class quiet:
    """Swallow the reference codes' chatter (progress prints) during timing."""

    def __enter__(self):
        self._out = sys.stdout
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        sys.stdout.close()
        sys.stdout = self._out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_case(k, args, em):
    c = CASES[k]
    names = c["labels"]
    n_train = args.n_train or c["n_train"]
    n_test = args.n_test or c["n_test"]
    wave = em.wavelength[PIX]
    t0 = time.perf_counter()
    lt, ft, it = make_data(em, names, n_train, 100 + k, args.snr)
    le, fe, ie = make_data(em, names, n_test, 200 + k, args.snr)
    print(f"case {k} labels: {n_train} train / {n_test} test x {ft.shape[1]} px, S/N {args.snr} "
          f"(data made in {time.perf_counter() - t0:.1f} s)", flush=True)
    codes = [Ours(), Casey()]
    if k == 3 or args.ho7:
        codes.append(Ho())
    res = {"case": k, "n_train": n_train, "n_test": n_test, "n_pix": int(ft.shape[1]), "snr": args.snr,
           "labels": list(names), "codes": {}}
    for code in codes:                                     # training, interleaved
        t = time.perf_counter()
        with quiet():
            code.train(lt, ft, it, names, wave)
        dt = time.perf_counter() - t
        res["codes"][code.name] = {"train_s": dt}
        print(f"  train {code.name:<16} {dt:8.2f} s   (peak RSS so far {peak_rss_gb():.1f} GB)", flush=True)
    for code in codes:                                     # test step, interleaved
        n_sub = n_test if code.name == "distlabels" else min(n_test, args.ref_test or n_test)
        t = time.perf_counter()
        with quiet():
            lab, err = code.test(fe[:n_sub], ie[:n_sub], wave)
        dt = time.perf_counter() - t
        r = res["codes"][code.name]
        r.update(test_ms_per_star=1e3 * dt / n_sub, n_tested=n_sub, **stats(lab, err, le[:n_sub]))
        print(f"  test  {code.name:<16} {r['test_ms_per_star']:8.3f} ms/star on {n_sub}", flush=True)
    ours = codes[0]
    t = time.perf_counter()
    lab, err = ours.test(fe, ie, wave, debias=False)
    res["codes"]["distlabels (plain)"] = dict(test_ms_per_star=1e3 * (time.perf_counter() - t) / n_test,
                                              **stats(lab, err, le))
    t = time.perf_counter()
    lab, err, rv = ours.test_rv_free(fe, ie, wave)
    res["codes"]["distlabels (RV free)"] = dict(test_ms_per_star=1e3 * (time.perf_counter() - t) / n_test,
                                                rv_scatter_kms=float(np.std(rv)), **stats(lab, err, le))
    # The same training with the held-out error floor (model inadequacy) measured and added.
    floor = Ours()
    ts = training_set_from_arrays(ft, it, lt, names, wave, wavelength_medium="air")
    t = time.perf_counter()
    floor.model, rep = train_cannon(ts, CannonTrainConfig(normalise="none", systematics=True))
    t_train = time.perf_counter() - t
    lab, err = floor.test(fe, ie, wave)
    res["codes"]["distlabels (+error floor)"] = dict(train_s=t_train, **stats(lab, err, le),
                                                     floor=rep.systematics.get("label_systematic_error"))
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def report(res):
    names = res["labels"]
    print(f"\n== {len(names)} labels: {res['n_train']} train / {res['n_test']} test, {res['n_pix']} px, "
          f"S/N {res['snr']}, one core ==")
    base = res["codes"]["distlabels"]
    print(f"{'code':<26}{'train s':>9}{'test ms/star':>14}  " + "  ".join(f"{n:>22}" for n in names))
    for code, r in res["codes"].items():
        tr = f"{r['train_s']:9.2f}" if "train_s" in r else f"{'':>9}"
        cells = [f"{b:+8.3g} {s:6.3g} {p:5.2f}" for b, s, p in zip(r["bias"], r["scatter"], r.get("pull_std", [np.nan] * 9))]
        ts_ = f"{r['test_ms_per_star']:14.3f}" if "test_ms_per_star" in r else f"{'':>14}"
        print(f"{code:<26}{tr}{ts_}  " + "  ".join(f"{c:>22}" for c in cells))
    print("   (per label: bias, scatter, pull std; reference errors converted from scaled to physical units)")
    for ref in ("annieslasso", "TheCannon (Ho)"):
        if ref in res["codes"]:
            r = res["codes"][ref]
            print(f"speed-up vs {ref}: test {r['test_ms_per_star'] / base['test_ms_per_star']:.1f}x, "
                  f"train {r['train_s'] / base['train_s']:.1f}x; scatter ratio (plain/ref) "
                  f"{np.round(np.array(res['codes']['distlabels (plain)']['scatter']) / np.array(r['scatter']), 3).tolist()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["3", "7", "all"], default="3")
    ap.add_argument("--ho7", action="store_true", help="also run Ho's code on the 7-label case (~13 GB, ~11 min)")
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--ref-test", type=int, help="test the reference codes on the first N test stars only")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (pinned to 1), "
          f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}; "
          f"load average {os.getloadavg()}")
    em = load_emulator()
    out = [run_case(k, args, em) for k in ((3, 7) if args.case == "all" else (int(args.case),))]
    for r in out:
        report(r)
    print(f"load average at the end (1/5/15 min): {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
