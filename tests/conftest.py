"""Shared fixtures: a real trained emulator (bossbrain, imported through the safe unpickler) and
small mock stores made from it. Session-scoped: built once, read by many tests."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from distlabels.config import MockConfig
from distlabels.io.store import list_column, write_store


def _have(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


@pytest.fixture(scope="session")
def bossbrain_model_dir(tmp_path_factory):
    # A GPU box without the 68 MB bossbrain wheel can be handed the same emulator already imported
    # (`distlabels models import ...` output: our own safetensors + JSON, no pickle involved).
    pre = os.environ.get("DISTLABELS_TEST_BOSSBRAIN_DIR")
    if pre:
        src = json.loads((Path(pre) / "model.json").read_text()).get("source", {})
        if src.get("file") != "ann_22pars_4000-5000.pkl":
            pytest.fail(f"DISTLABELS_TEST_BOSSBRAIN_DIR={pre} is not the imported 4000-5000 K bossbrain emulator")
        return Path(pre)
    if not _have("bossbrain"):
        pytest.skip("bossbrain is not installed (pip install 'distlabels[test]')")
    from distlabels.models.importers import import_bossbrain

    return import_bossbrain("4000-5000", tmp_path_factory.mktemp("models") / "bb45")


@pytest.fixture(scope="session")
def bossbrain_model(bossbrain_model_dir):
    from distlabels.models import load

    return load(bossbrain_model_dir)


BAD_ROWS = {"bad:nan-flux": "all-NaN flux", "bad:zero-ivar": "ivar zero everywhere",
            "bad:few-pixels": "only 20 usable pixels"}


def add_bad_rows(table: pa.Table, n_pix: int) -> pa.Table:
    """Append three unusable spectra (NaN flux, zero ivar, too few pixels) to a store table."""
    flux = np.ones((3, n_pix), np.float32)
    ivar = np.full((3, n_pix), 100.0, np.float32)
    flux[0] = np.nan
    ivar[1] = 0.0
    ivar[2, 20:] = 0.0
    rows = {c: table.column(c).slice(0, 3) for c in table.column_names}
    rows["source_id"] = pa.array(list(BAD_ROWS))
    rows["flux"] = list_column(flux)
    rows["ivar"] = list_column(ivar)
    rows["mask"] = list_column(np.zeros((3, n_pix), bool), pa.bool_())
    extra = pa.table({c: rows[c] for c in table.column_names}).cast(table.schema)
    return pa.concat_tables([table, extra])


@pytest.fixture(scope="session")
def mock_snr50(bossbrain_model):
    """(table, meta) of 240 LAMOST-like mock stars at S/N 50."""
    from distlabels.mock import make_mock

    return make_mock(bossbrain_model, MockConfig(n=240, snr_min=50, snr_max=50, seed=7))


@pytest.fixture(scope="session")
def mock_store(tmp_path_factory, mock_snr50):
    """A store of the S/N 50 mock plus three unusable spectra."""
    table, meta = mock_snr50
    table = add_bad_rows(table, len(meta["wavelength_aa"]))
    root = tmp_path_factory.mktemp("stores") / "snr50"
    write_store(root, table, meta, max_rows_per_partition=60)
    return root


@pytest.fixture(scope="session")
def fitted_catalog(tmp_path_factory, bossbrain_model_dir, mock_store):
    """The S/N 50 mock store fitted on a real 2-worker LocalCluster: (catalog path, RunSummary)."""
    from distlabels.config import RunConfig
    from distlabels.pipeline import run_fit

    out = tmp_path_factory.mktemp("catalogs") / "snr50"
    summary = run_fit(bossbrain_model_dir, mock_store, out, RunConfig(workers=2, task_rows=40, progress=False))
    return out, summary


# ----- The Cannon and The Payne (training) ------------------------------------------------------
CANNON_LABELS = ("teff", "logg", "mh")


def _truth_parts(n_pix: int, seed: int, n_labels: int):
    from distlabels.models.cannon import n_terms

    rng = np.random.default_rng(seed)
    T = n_terms(n_labels)
    n_lines = max(n_pix // 12, 4)
    centres = rng.uniform(2, n_pix - 3, n_lines)
    depth = np.zeros((n_lines, T))
    depth[:, 0] = rng.uniform(0.05, 0.4, n_lines)
    depth[:, 1:n_labels + 1] = rng.normal(0, 0.03, (n_lines, n_labels))
    depth[:, n_labels + 1:] = rng.normal(0, 0.015, (n_lines, T - n_labels - 1))
    pivot = np.array([4500.0, 2.0, -0.5])[:n_labels]
    scale = np.array([800.0, 2.5, 1.2])[:n_labels]
    # Uniform in log(wavelength), like most survey grids: 5000-6000 A.
    wave = 5000.0 * 1.2 ** (np.arange(n_pix) / (n_pix - 1))
    return centres, depth, pivot, scale, wave


def _line_profiles(centres, pixel_position):
    return np.exp(-0.5 * ((np.asarray(pixel_position)[..., None] - centres) / 1.5) ** 2)


def quadratic_truth(n_pix: int = 300, seed: int = 0, n_labels: int = 3):
    """A known quadratic-in-labels spectral model: (theta (n_pix, T), pivot, scale, wavelength_aa).

    Spectrum-like: every coefficient column is a sum of Gaussian absorption lines (sigma 1.5
    pixels, one line per ~12 pixels) whose depths depend on the labels, so the model is smooth on
    the pixel scale like a real spectrum. Intercept ~1 minus lines, linear terms ~3e-2 per line,
    quadratic ~1.5e-2, on a log-uniform vacuum grid 5000-6000 A. The truth the Cannon tests use;
    :func:`quadratic_flux_shifted` evaluates the same model, continuous, at any RV.
    """
    centres, depth, pivot, scale, wave = _truth_parts(n_pix, seed, n_labels)
    theta = -_line_profiles(centres, np.arange(n_pix)) @ depth
    theta[:, 0] += 1
    return theta, pivot, scale, wave


def quadratic_flux_shifted(labels, rv_kms, n_pix: int = 300, seed: int = 0):
    """The truth's exact flux (n, n_pix) of stars at labels (n, 3) moving at rv_kms (n,): the
    continuous line profiles evaluated at each observed pixel's rest wavelength (no interpolation)."""
    import torch

    from distlabels.models.cannon import label_vector

    centres, depth, pivot, scale, wave = _truth_parts(n_pix, seed, 3)
    b = np.asarray(rv_kms, np.float64)[:, None] / 299792.458
    rest = wave[None] / np.sqrt((1 + b) / (1 - b))                               # (n, n_pix)
    pos = np.log(rest / wave[0]) / np.log(wave[1] / wave[0])                     # fractional pixel
    v = label_vector(torch.as_tensor((np.atleast_2d(labels) - pivot) / scale)).numpy()   # (n, T)
    lines = _line_profiles(centres, pos)                                         # (n, n_pix, n_lines)
    return 1 - np.einsum("npl,lt,nt->np", lines, depth, v) + 0 * pos


def quadratic_continuum_mask(n_pix: int = 300, seed: int = 0):
    """(n_pix,) bool: pixels farther than 3.7 sigma from every line of the truth (true continuum)."""
    centres = _truth_parts(n_pix, seed, 3)[0]
    return _line_profiles(centres, np.arange(n_pix)).max(-1) < 1e-3


def quadratic_flux(theta, pivot, scale, labels):
    """Noiseless flux (n, n_pix) of the quadratic model at physical labels (n, L)."""
    import torch

    from distlabels.models.cannon import label_vector

    u = torch.as_tensor((np.atleast_2d(labels) - pivot) / scale, dtype=torch.float64)
    return label_vector(u).numpy() @ theta.T


def draw_labels(n: int, rng, box=((4100, 4900), (1.0, 3.0), (-1.0, 0.0))):
    return np.column_stack([rng.uniform(a, b, n) for a, b in box])


@pytest.fixture(scope="session")
def cannon_mock_stores(tmp_path_factory, bossbrain_model):
    """Training (n=400, S/N 60-150) and test (n=60, S/N 40-120) stores made by the mock survey from
    the bossbrain emulator: LAMOST-like grid, RV within +-100 km/s, smooth continuum, noise; teff,
    logg and [M/H] vary, every [X/M] is 0 (so a 3-label Cannon can describe the stars)."""
    from distlabels.mock import make_mock

    root = tmp_path_factory.mktemp("cannon")
    out = {}
    for name, n, snr, seed in (("train", 400, (60, 150), 11), ("test", 60, (40, 120), 12)):
        rng = np.random.default_rng(seed)
        lab = np.zeros((n, bossbrain_model.n_labels))
        lab[:, :3] = draw_labels(n, rng, ((4200, 4800), (1.5, 3.2), (-0.6, 0.3)))
        table, meta = make_mock(bossbrain_model, MockConfig(n=n, snr_min=snr[0], snr_max=snr[1], seed=seed), labels=lab)
        out[name] = write_store(root / name, table, meta, max_rows_per_partition=50).root
    return out


@pytest.fixture(scope="session")
def cannon_model_dir(tmp_path_factory, cannon_mock_stores):
    """A Cannon trained on the training store (chebyshev pseudo-continuum, RV from true_rv)."""
    from distlabels.config import CannonTrainConfig
    from distlabels.train.cannon import train_cannon
    from distlabels.train.data import load_training_set

    ts = load_training_set(cannon_mock_stores["train"], list(CANNON_LABELS))
    model, _ = train_cannon(ts, CannonTrainConfig())
    return model.save(tmp_path_factory.mktemp("cannon_model") / "model")


# ----- real APOGEE data and The Payne's per-pixel network (../shared/data; skipped when absent) ----
SHARED_DATA_ENV = "DISTLABELS_SHARED_DATA"
APOGEE_NETWORK = "payne_apogee_dwarf_nn.npz"


def find_shared_data():
    """The folder of real APOGEE files: $DISTLABELS_SHARED_DATA, else ../shared/data (or ../../shared/data
    for a git worktree) next to the repository root; None when none holds the Payne network."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cands = [Path(os.environ[SHARED_DATA_ENV])] if os.environ.get(SHARED_DATA_ENV) else []
    cands += [root.parent / "shared" / "data", root.parent.parent / "shared" / "data"]
    for c in cands:
        if (c / APOGEE_NETWORK).is_file():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data():
    d = find_shared_data()
    if d is None:
        pytest.skip(f"real APOGEE data (../shared/data or ${SHARED_DATA_ENV}) not present")
    return d


@pytest.fixture(scope="session")
def apogee_payne_dir(tmp_path_factory, shared_data):
    """The Payne's per-pixel APOGEE dwarf network with its continuum pixels and pixel mask, imported."""
    from distlabels.models.importers import import_payne_npz

    d = shared_data
    return import_payne_npz(d / APOGEE_NETWORK, tmp_path_factory.mktemp("models") / "apogee_payne",
                            wavelength=d / "apogee_wavelength.npz",
                            continuum_pixels=d / "apogee_cannon_continuum_pixels.npz", bad_pixels=d / "apogee_mask.npz")


@pytest.fixture(scope="session")
def apogee_payne(apogee_payne_dir):
    from distlabels.models import load

    return load(apogee_payne_dir)
