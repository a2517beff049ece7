"""Payne training on a small grid made from the bossbrain emulator: the stated MAE target, exact
resumption from a checkpoint, and the trained model loading and fitting through the kernel."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from distlabels.config import FitConfig, PayneTrainConfig
from distlabels.fit import fit_spectra
from distlabels.io.store import list_column, write_store
from distlabels.models import PayneMLP, load
from distlabels.train.data import load_training_set
from distlabels.train.payne import train_payne

PIX = slice(3000, 4000)          # 1,000 pixels, 5000-5500 A (air)
MAE_TARGET = 4e-3                # this test's stated target (the benchmark's is 2e-3 on >= 5,000 spectra)


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory, bossbrain_model):
    """A grid store: 1,000 noiseless bossbrain spectra, teff/logg/[M/H] uniform in a box, [X/M] = 0."""
    rng = np.random.default_rng(0)
    n = 1000
    lab = np.zeros((n, bossbrain_model.n_labels))
    lab[:, 0], lab[:, 1], lab[:, 2] = rng.uniform(4000, 5000, n), rng.uniform(1, 3.5, n), rng.uniform(-1, 0.4, n)
    flux = bossbrain_model.predict(lab)[:, PIX].astype(np.float32)
    t = pa.table({"source_id": [f"g{i:05d}" for i in range(n)], "ra": rng.uniform(0, 360, n),
                  "dec": rng.uniform(-60, 60, n), "flux": list_column(flux),
                  "ivar": list_column(np.full(flux.shape, 1e4, np.float32)),
                  "true_teff": lab[:, 0], "true_logg": lab[:, 1], "true_mh": lab[:, 2], "true_rv": np.zeros(n)})
    meta = {"wavelength_aa": bossbrain_model.wavelength[PIX].tolist(), "wavelength_medium": "air",
            "rv_frame": "rest", "resolution": None}
    return write_store(tmp_path_factory.mktemp("grid") / "grid", t, meta, max_rows_per_partition=500).root


@pytest.fixture
def one_thread():
    """Small networks train faster on one thread (and do not fight the suite's other tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_payne_reaches_mae_target_and_fits_through_the_kernel(grid_store, tmp_path, one_thread):
    ts = load_training_set(grid_store, ["teff", "logg", "mh"])
    cfg = PayneTrainConfig(hidden=(64, 64), epochs=150, batch_size=100, learning_rate=3e-3, optimizer="adam",
                           lr_patience=15, patience=1000)
    model, rep = train_payne(ts, cfg, device="cpu", out_dir=tmp_path / "m", progress=False)
    assert rep.validation_mae < MAE_TARGET, rep.summary()
    # Independent check of the reported MAE on the held-out spectra, from the saved model.
    model.save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert isinstance(back, PayneMLP) and back.label_names == ("teff", "logg", "mh")
    from distlabels.train.payne import split

    _, va = split(len(ts), cfg.validation_fraction, cfg.seed)
    mae = np.abs(back.predict(ts.labels[va]) - ts.flux[va]).mean()
    assert mae == pytest.approx(rep.validation_mae, rel=1e-3)
    # A trivial emulator (the mean spectrum) is far worse: the network learned the labels.
    assert np.abs(ts.flux[va] - ts.flux.mean(0)).mean() > 5 * mae
    assert back.model_variance.shape == (1000,) and np.all(back.model_variance.numpy() > 0)  # emulator error
    # The kernel fits observed spectra of the trained emulator (R = 3000, every other pixel) back to
    # their labels.
    from distlabels.io.wavelength import to_vacuum
    from distlabels.mock import lsf_matrix

    lab = ts.labels[va[:5]]
    conv = lsf_matrix(to_vacuum(back.wavelength, "air"), 3000.0)
    flux = (conv @ back.predict(lab).T).T[:, 20:-20:2]
    res = fit_spectra(back, back.wavelength[20:-20:2], flux, np.full_like(flux, 1e4), wavelength_medium="air",
                      resolution=3000.0, config=FitConfig(continuum_degree=-1))
    dev = np.abs(res.labels - lab) / res.errors          # noiseless: well inside one error
    assert np.all(dev < 1.0) and np.median(dev) < 0.75, dev


def test_resume_continues_exactly(grid_store, tmp_path, one_thread):
    """3 epochs, stop, resume to 6 == 6 epochs straight (weights bit for bit)."""
    ts = load_training_set(grid_store, ["teff", "logg", "mh"])
    ts.flux, ts.ivar, ts.labels = ts.flux[:200, :100], ts.ivar[:200, :100], ts.labels[:200]
    ts.wavelength_aa = ts.wavelength_aa[:100]
    base = dict(hidden=(16,), batch_size=50, learning_rate=1e-3, checkpoint_every=1)
    straight, _ = train_payne(ts, PayneTrainConfig(epochs=6, **base), out_dir=tmp_path / "a", progress=False)
    train_payne(ts, PayneTrainConfig(epochs=3, **base), out_dir=tmp_path / "b", progress=False)
    resumed, rep = train_payne(ts, PayneTrainConfig(epochs=6, **base), out_dir=tmp_path / "b", resume=True,
                               progress=False)
    assert rep.loop.epochs_run == 6 and len(rep.loop.history) == 6
    for a, b in zip(straight.weights, resumed.weights):
        assert torch.equal(a, b)
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "b").rglob("*"))
