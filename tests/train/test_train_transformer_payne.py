"""TransformerPayne training on a small grid made from the bossbrain emulator: held-out MAE far below
the mean-spectrum predictor, exact resume, fine-tuning from the command line, a fit through the kernel
that recovers the labels of spectra the trained model made, the same model through ``distlabels fit``
on a real LocalCluster, and (with CUDA) training on the GPU."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distlabels.config import FitConfig, MockConfig, TransformerPayneTrainConfig
from distlabels.fit import fit_spectra
from distlabels.io.store import list_column, write_store
from distlabels.models import TransformerPayne, load
from distlabels.train.data import load_training_set
from distlabels.train.payne import split
from distlabels.train.transformer_payne import train_transformer_payne

LABELS = ["teff", "logg", "mh"]
SMALL = dict(d_model=32, token_hidden=64, n_tokens=8, n_heads=4, n_blocks=2, n_freq=32, pixels_per_sample=64,
             batch_size=16, learning_rate=2e-3, validation_fraction=0.2, patience=100)


def grid_table(em, n, seed, lo_aa, hi_aa):
    """n noiseless bossbrain spectra on its own pixels in [lo_aa, hi_aa), teff/logg/[M/H] uniform, [X/M] = 0."""
    rng = np.random.default_rng(seed)
    pix = (em.wavelength >= lo_aa) & (em.wavelength < hi_aa)
    lab = np.zeros((n, em.n_labels))
    lab[:, 0], lab[:, 1], lab[:, 2] = rng.uniform(4000, 5000, n), rng.uniform(1, 3.5, n), rng.uniform(-1, 0.4, n)
    flux = em.predict(lab)[:, pix].astype(np.float32)
    t = pa.table({"source_id": [f"g{seed}-{i:05d}" for i in range(n)], "ra": rng.uniform(0, 360, n),
                  "dec": rng.uniform(-60, 60, n), "flux": list_column(flux),
                  "ivar": list_column(np.full(flux.shape, 1e4, np.float32)),
                  "true_teff": lab[:, 0], "true_logg": lab[:, 1], "true_mh": lab[:, 2], "true_rv": np.zeros(n)})
    meta = {"wavelength_aa": em.wavelength[pix].tolist(), "wavelength_medium": em.wavelength_medium,
            "rv_frame": "rest", "resolution": None}
    return t, meta


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory, bossbrain_model):
    """300 grid spectra x 200 px (5000-5100 A, air)."""
    t, meta = grid_table(bossbrain_model, 300, 0, 5000.0, 5100.0)
    return write_store(tmp_path_factory.mktemp("tpgrid") / "grid", t, meta, max_rows_per_partition=300).root


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(grid_store, tmp_path_factory):
    """A small TransformerPayne trained for 10 epochs (~15 s on one thread); saved and reloaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ts = load_training_set(grid_store, LABELS)
        cfg = TransformerPayneTrainConfig(**SMALL, epochs=10)
        model, rep = train_transformer_payne(ts, cfg, device="cpu", progress=False)
        d = tmp_path_factory.mktemp("tpmodel") / "tp"
        model.save(d)
    finally:
        torch.set_num_threads(n)
    return ts, cfg, rep, d


def test_training_beats_the_mean_spectrum_by_far(trained, one_thread):
    ts, cfg, rep, d = trained
    model = load(d)
    assert isinstance(model, TransformerPayne) and model.label_names == tuple(LABELS)
    tr, va = split(len(ts), cfg.validation_fraction, cfg.seed)
    # Independent of the report: held-out spectra predicted by the reloaded model vs the trivial predictor.
    mae = float(np.abs(model.predict(ts.labels[va]) - ts.flux[va]).mean())
    trivial = float(np.abs(ts.flux[tr].mean(0) - ts.flux[va]).mean())
    assert mae == pytest.approx(rep.validation_mae, rel=1e-3)
    assert mae < 0.25 * trivial, (mae, trivial, rep.summary())
    # per-pixel model variance = validation MSE, on the model's pixels
    assert model.model_variance.shape == (ts.flux.shape[1],) and float(model.model_variance.min()) > 0
    import json

    assert json.loads((d / "model.json").read_text())["training"]["n_train"] == len(tr)


def test_resume_is_exact(grid_store, tmp_path, one_thread):
    ts = load_training_set(grid_store, LABELS)
    ts.flux, ts.ivar, ts.wavelength_aa = ts.flux[:80, :60], ts.ivar[:80, :60], ts.wavelength_aa[:60]
    ts.labels, ts.source_id = ts.labels[:80], ts.source_id[:80]
    cfg = TransformerPayneTrainConfig(d_model=16, token_hidden=16, n_tokens=4, n_blocks=1, pixels_per_sample=20,
                                      batch_size=8, checkpoint_every=1)
    import dataclasses

    full, _ = train_transformer_payne(ts, dataclasses.replace(cfg, epochs=2), out_dir=tmp_path / "a", progress=False)
    train_transformer_payne(ts, dataclasses.replace(cfg, epochs=1), out_dir=tmp_path / "b", progress=False)
    resumed, rep = train_transformer_payne(ts, dataclasses.replace(cfg, epochs=2), out_dir=tmp_path / "b",
                                           resume=True, progress=False)
    assert rep.loop.epochs_run == 2
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_fit_recovers_labels_of_spectra_the_model_made(trained, one_thread):
    """Noisy spectra made by the trained network itself, fitted through the kernel (autodiff Jacobian)."""
    _, _, _, d = trained
    model = load(d)
    rng = np.random.default_rng(11)
    truth = np.column_stack([rng.uniform(4200, 4800, 6), rng.uniform(1.5, 3.0, 6), rng.uniform(-0.8, 0.2, 6)])
    wave = model.wavelength[20:-20]                    # observed pixels: a subset, the model evaluates anywhere
    clean = model.predict(truth, wave)
    snr = 200.0
    flux = clean + rng.normal(size=clean.shape) / snr
    ivar = np.full(clean.shape, snr ** 2)
    cfg = FitConfig(masks="none", v_max_kms=50.0, continuum_degree=1, library_size=256)
    res = fit_spectra(model, wave, flux, ivar, wavelength_medium=model.wavelength_medium, config=cfg)
    pull = (res.labels - truth) / res.errors
    assert np.all(np.isfinite(pull)), res.labels
    assert np.all(np.abs(pull) < 5), (res.labels, truth, res.errors)
    assert np.all(np.abs(res.labels[:, 0] - truth[:, 0]) < 100)           # K
    assert np.all(np.abs(res.rv) < 5 * res.rv_err + 0.5)
    assert np.median(res.chi2_red) < 1.3


def test_fit_command_on_a_local_cluster(trained, tmp_path, one_thread):
    """``distlabels fit`` with a TransformerPayne model dir on a 1-worker LocalCluster: every star once, labels near truth."""
    from distlabels.cli.main import main as cli_main
    from distlabels.mock import make_mock

    _, _, _, d = trained
    model = load(d)
    table, meta = make_mock(model, MockConfig(n=8, seed=5, grid="model", snr_min=100, snr_max=100, rv_max_kms=20,
                                              masked_fraction=0.0, labels_from="uniform"))
    store = write_store(tmp_path / "store", table, meta).root
    (tmp_path / "fit.yaml").write_text("fit:\n  v_max_kms: 60\n  masks: none\n  library_size: 256\n")
    rc = cli_main(["fit", "--model", str(d), "--spectra", str(store), "--out", str(tmp_path / "cat"), "--workers", "1",
                   "--config", str(tmp_path / "fit.yaml"), "--no-progress", "--continuum-degree", "2"])
    assert rc == 0
    cat = pq.read_table(tmp_path / "cat" / "dataset").to_pandas()
    assert sorted(cat["source_id"]) == sorted(table.column("source_id").to_pylist())
    truth = {s: t for s, t in zip(table.column("source_id").to_pylist(), table.column("true_teff").to_numpy())}
    dt = np.array([row.teff - truth[row.source_id] for row in cat.itertuples()])
    assert np.median(np.abs(dt)) < 60, dt


def test_cli_trains_and_fine_tuning_transfers_to_a_small_grid(tmp_path, bossbrain_model, grid_store, trained,
                                                               one_thread):
    """--init: a trained model fine-tuned on 45 spectra is far better than the same run from scratch."""
    from distlabels.cli.main import main as cli_main

    out = tmp_path / "tp"
    rc = cli_main(["train", "transformer-payne", "--grid", str(grid_store), "--labels", "teff,logg,mh", "--epochs", "1",
                   "--d-model", "16", "--token-hidden", "16", "--n-blocks", "1", "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "validation.json").is_file() and load(out).net.arch["d_model"] == 16
    _, _, _, init_dir = trained
    base = load(init_dir)
    # A smaller grid on part of the wavelengths: 60 other spectra, 5040-5080 A.
    t, meta = grid_table(bossbrain_model, 60, 9, 5040.0, 5080.0)
    small = write_store(tmp_path / "small", t, meta).root
    common = ["--grid", str(small), "--epochs", "3", "--learning-rate", "5e-4", "--pixels-per-sample", "20",
              "--batch-size", "8", "--validation-fraction", "0.25", "--no-progress"]
    assert cli_main(["train", "transformer-payne", *common, "--init", str(init_dir), "--out", str(tmp_path / "ft")]) == 0
    assert cli_main(["train", "transformer-payne", *common, "--labels", "teff,logg,mh", "--d-model", "32",
                     "--token-hidden", "64", "--out", str(tmp_path / "scratch")]) == 0
    tuned, scratch = load(tmp_path / "ft"), load(tmp_path / "scratch")
    assert tuned.net.arch == base.net.arch and tuned.label_names == base.label_names
    np.testing.assert_array_equal(tuned.label_bounds, base.label_bounds)     # the initial model's scaling
    ts = load_training_set(small, LABELS)
    _, va = split(len(ts), 0.25, 0)
    mae = {name: float(np.abs(m.predict(ts.labels[va], ts.wavelength_aa) - ts.flux[va]).mean())
           for name, m in (("before", base), ("tuned", tuned), ("scratch", scratch))}
    assert mae["tuned"] < 0.5 * mae["scratch"] and mae["tuned"] < 1.5 * mae["before"], mae
    # the fine-tuned network still evaluates on the first grid's wavelengths
    assert tuned.meta["training_wavelength_range_aa"][0] <= base.wavelength[0]


def test_fine_tuning_refuses_another_label_set(trained, grid_store, tmp_path, capsys):
    from distlabels.cli.main import main as cli_main

    _, _, _, d = trained
    rc = cli_main(["train", "transformer-payne", "--grid", str(grid_store), "--labels", "teff,logg", "--init", str(d),
                   "--epochs", "1", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("distlabels: error:") and "same --labels" in err and len(err.splitlines()) == 1


def test_help_and_init_of_another_kind(grid_store, bossbrain_model_dir, tmp_path, capsys):
    from distlabels.cli.main import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["train", "transformer-payne", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--init MODEL_DIR" in out and "--pixels-per-sample" in out
    rc = cli_main(["train", "transformer-payne", "--grid", str(grid_store), "--init", str(bossbrain_model_dir),
                   "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a transformer-payne" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_and_evaluation_on_cuda(grid_store, trained):
    ts = load_training_set(grid_store, LABELS)
    cfg = TransformerPayneTrainConfig(**SMALL, epochs=3)
    model, rep = train_transformer_payne(ts, cfg, device="cuda", progress=False)
    assert rep.device.startswith("cuda") and rep.validation_mae < 0.05
    _, _, _, d = trained
    cpu = load(d)
    gpu = load(d, device="cuda")
    lab = ts.labels[:16]
    np.testing.assert_allclose(gpu.predict(lab), cpu.predict(lab), atol=1e-4)
    with torch.no_grad():
        x = gpu.scale(torch.as_tensor(lab, device="cuda")).float()
        s = gpu.value_and_jacobian_stacked(x)
    assert s.is_cuda and s.shape == (16, 4, gpu.n_pix)
