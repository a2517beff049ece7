"""``distlabels crb``: its bounds against an independent finite-difference Fisher matrix in numpy (model
spectra from the mock path, not the kernel), 1/SNR scaling, outputs and one-line errors."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from distlabels.cli.main import main
from distlabels.config import MockConfig
from distlabels.io.store import list_to_numpy
from distlabels.io.wavelength import SURVEY_GRIDS
from distlabels.mock import make_mock

C_KMS = 299792.458
FITTED = ("teff", "logg", "mh")


def _read_csv(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def _run(capsys, *argv):
    rc = main(["crb", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def crb_run(bossbrain_model_dir, tmp_path_factory):
    """The CLI at S/N 50 and 25: 4 stars on a Teff-log g grid, teff, logg, mh fitted, no masks."""
    out = tmp_path_factory.mktemp("crb")
    runs = {}
    for snr in (50, 25):
        argv = ["crb", "--model", str(bossbrain_model_dir), "--snr", str(snr), "--labels", ",".join(FITTED),
                "--stars", "teff-logg", "--n", "4", "--masks", "none", "--out", str(out / f"s{snr}.csv"),
                "--no-progress"]
        if snr == 50:
            argv += ["--out", str(out / "s50.png")]
        assert main(argv) == 0
        runs[snr] = _read_csv(out / f"s{snr}.csv")
    return out, runs


def _fd_fisher_sigma(model, star, snr, monkeypatch):
    """sigma of FITTED from a numpy Fisher matrix: central differences of noiseless mock spectra (the
    mock's own LSF, Doppler shift and spline sampling) in each fitted label and in RV (the grid moved by
    +-1 km/s), and a cubic polynomial continuum per segment (any basis of it gives the same marginal bound)."""
    names = list(model.label_names)
    steps = {"teff": 2.0, "logg": 0.01, "mh": 0.01}
    rows = [star]
    for name in FITTED:
        for sgn in (1, -1):
            s = star.copy()
            s[names.index(name)] += sgn * steps[name]
            rows.append(s)
    lab = np.array(rows)

    def spectra(name, labels):
        table, meta = make_mock(model, MockConfig(n=len(labels), noiseless=True, grid=name), labels=labels)
        return list_to_numpy(table["flux"], len(meta["wavelength_aa"])).astype(np.float64), meta

    flux, meta = spectra("lamost", lab)
    base = SURVEY_GRIDS["lamost"]
    shifted = []
    for v in (1.0, -1.0):
        b = v / C_KMS
        monkeypatch.setitem(SURVEY_GRIDS, "crb-test", dict(base, start_aa=base["start_aa"] / np.sqrt((1 + b) / (1 - b))))
        shifted.append(spectra("crb-test", star[None])[0][0])
    f0 = flux[0]
    cols = [(flux[1 + 2 * k] - flux[2 + 2 * k]) / (2 * steps[n]) for k, n in enumerate(FITTED)]
    cols.append((shifted[0] - shifted[1]) / 2.0)
    wave = np.asarray(meta["wavelength_aa"])
    for lo, hi in meta["segments"]:
        inside = (wave >= lo) & (wave < hi)
        t = np.where(inside, 2 * (wave - lo) / (hi - lo) - 1, 0.0)
        for k in range(4):
            cols.append(np.where(inside, t**k * f0, 0.0))
    J = np.stack(cols, 1)                                         # (n_pix, 3 labels + RV + 8 continuum)
    F = snr**2 * J.T @ J
    return np.sqrt(np.diag(np.linalg.inv(F))[: len(FITTED)])


def test_crb_cli_matches_finite_difference_fisher(crb_run, bossbrain_model, monkeypatch):
    out, runs = crb_run
    got = runs[50]
    names = list(bossbrain_model.label_names)
    for i in (0, 3):                                              # two corners of the Teff-log g grid
        star = np.array([got[n][i] for n in names])
        ref = _fd_fisher_sigma(bossbrain_model, star, 50.0, monkeypatch)
        mine = np.array([got[f"sigma_{n}"][i] for n in FITTED])
        np.testing.assert_allclose(mine, ref, rtol=0.01, err_msg=f"star {i}: {mine} vs {ref}")
    assert (out / "s50.png").stat().st_size > 10_000


def test_crb_scales_as_one_over_snr(crb_run):
    _, runs = crb_run
    for n in FITTED:
        np.testing.assert_allclose(runs[25][f"sigma_{n}"], 2 * runs[50][f"sigma_{n}"], rtol=1e-4)
    np.testing.assert_allclose(runs[25]["sigma_rv_kms"], 2 * runs[50]["sigma_rv_kms"], rtol=1e-4)


def test_crb_cli_table_and_errors(bossbrain_model_dir, capsys):
    rc, out, _ = _run(capsys, "--model", bossbrain_model_dir, "--snr", 30, "--labels", "teff,logg,mh,bam", "--n", 8,
                      "--max-sigma", "bam=0.01")
    assert rc == 0
    assert "S/N 30" in out and "8 stars drawn from the model's training labels" in out
    table = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in FITTED + ("bam",)}
    assert set(table) == {"teff", "logg", "mh", "bam"}
    assert table["teff"][-1] == "yes" and table["bam"][-1] == "no"    # Ba to 0.01 dex from R 1800: no
    assert "measurable at S/N 30" in out and "not measurable: bam" in out
    for argv, msg in ((["--snr", -1], "--snr must be a positive"), (["--snr", 10, "--labels", "teff,xx"], "unknown label"),
                      (["--snr", 10, "--out", "x.txt"], ".csv")):
        rc, _, err = _run(capsys, "--model", bossbrain_model_dir, *argv)
        assert rc == 2 and err.startswith("distlabels: error:") and msg in err and "Traceback" not in err


def test_fit_cli_takes_vsini_bound_and_limb_darkening():
    from distlabels.cli.main import build_parser
    from distlabels.cli.production import fit_config

    args = build_parser().parse_args(["fit", "--model", "m", "--spectra", "s", "--out", "c", "--fit-vsini",
                                      "--vsini-max-kms", "300", "--limb-darkening", "0.3"])
    cfg = fit_config(args)
    assert cfg.fit_vsini and cfg.vsini_max_kms == 300.0 and cfg.limb_darkening == 0.3
    plain = fit_config(build_parser().parse_args(["fit", "--model", "m", "--spectra", "s", "--out", "c"]))
    assert plain.vsini_max_kms == 500.0 and plain.limb_darkening == 0.6 and not plain.fit_vsini
