"""DD-Payne: the gradient-regularised loss against an independent numpy / finite-difference
computation, the prior restoring the gradient spectrum of an abundance that correlates with [M/H]
in the reference labels, and the trained model going through save/load, the CLI and a LocalCluster fit.

The small run uses the bossbrain 4000-5000 K emulator both as the truth and as the prior (the
mechanism is what is tested; ``benchmarks/dd_payne.py`` uses a different emulator as the prior).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distlabels.config import DDPayneTrainConfig, MockConfig
from distlabels.fit.working_grid import chebyshev_basis
from distlabels.io.store import list_column, list_to_numpy, write_store
from distlabels.models import PayneMLP, load
from distlabels.train.cannon import training_set_from_arrays
from distlabels.train.dd_payne import (PriorGradients, dd_payne_loss, gradient_correlation, gradient_spectra,
                                       train_dd_payne, value_and_gradients)
from distlabels.train.payne import PayneNet

LABELS = ("teff", "logg", "mh", "mgm")
WINDOW_AA = (4800.0, 5600.0)          # vacuum: Mg b, many Fe lines; ~600 LAMOST-like pixels
SEGMENTS = ((4800.0, 5200.0), (5200.0, 5600.0))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ the loss, independently
def _np_mlp(weights, biases, x, slope=0.01):
    h = x
    for w, b in zip(weights[:-1], biases[:-1]):
        z = h @ w.T + b
        h = np.where(z > 0, z, slope * z)
    return h @ weights[-1].T + biases[-1]


def _np_jacobian(fun, x, eps=1e-6):
    """(n, L, n_pix) central differences of fun (n, L) -> (n, n_pix)."""
    out = []
    for j in range(x.shape[1]):
        d = np.zeros_like(x)
        d[:, j] = eps
        out.append((fun(x + d) - fun(x - d)) / (2 * eps))
    return np.stack(out, 1)


def test_loss_equals_independent_numpy_finite_difference_computation():
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    # Data grid (vacuum, 40 px in two segments) and a prior on a finer grid (80 px) at the same resolution.
    wave = np.linspace(5000.0, 5039.0, 40)
    segs = ((5000.0, 5019.5), (5019.5, 5040.0))
    wave_p = np.linspace(4995.0, 5045.0, 101)
    # Network labels a, b, c; the prior knows a, c, d (b: no gradient term; d: held at 0.3).
    names, prior_names = ("a", "b", "c"), ("a", "c", "d")
    lo, hi = np.array([0.0, -1.0, 2.0]), np.array([1.0, 1.0, 5.0])
    plo, phi = np.array([-0.5, 1.5, 0.0]), np.array([1.5, 6.0, 1.0])
    pw = [rng.normal(0, 1, (6, 3)), rng.normal(0, 0.3, (101, 6))]
    pb = [rng.normal(0, 0.5, 6), 1 + rng.normal(0, 0.05, 101)]
    prior = PayneMLP([torch.tensor(w, dtype=torch.float32) for w in pw], [torch.tensor(b, dtype=torch.float32) for b in pb],
                     label_names=prior_names, x_min=plo, x_max=phi, wavelength_aa=wave_p, wavelength_medium="vacuum")
    net = PayneNet(3, (7, 5), 40).double()
    n = 5
    labels = lo + rng.uniform(0, 1, (n, 3)) * (hi - lo)
    labels[4, 0] = 1.6                                   # outside the prior's box in label a: no gradient term
    x = (labels - lo) / (hi - lo) - 0.5
    flux = (1 + 0.2 * rng.normal(size=(n, 40))) * np.linspace(2, 3, 40)
    ivar = rng.uniform(50, 150, (n, 40))
    ivar[1, :7] = 0
    D = 2.5
    pg = PriorGradients(prior, names, hi - lo, wave, "vacuum", None, prior_fixed=(("d", 0.3),))
    _, g_prior, use = pg(labels)
    basis, _ = chebyshev_basis(wave, segs, 2)
    K = basis.shape[1]
    bb = np.stack([basis[:, i] * basis[:, j] for i in range(K) for j in range(K)], 1)
    grad_mask = torch.as_tensor(pg.label_mask, dtype=torch.float64)[:, None] * torch.as_tensor(pg.covered)[None]
    T = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    loss, _ = dd_payne_loss(net, T(x), T(flux), T(ivar), T(basis), T(bb), g_prior.double(), use, grad_mask, D)

    # Independent: numpy network, finite-difference Jacobians, lstsq continua, np.interp for the prior.
    W = [l.weight.detach().numpy() for l in net.layers]
    B = [l.bias.detach().numpy() for l in net.layers]
    F = _np_mlp(W, B, x)
    J = _np_jacobian(lambda xx: _np_mlp(W, B, xx), x)

    def prior_on_data(lab_dd_scaled):
        lab = (lab_dd_scaled + 0.5) * (hi - lo) + lo                     # network's scaled -> physical
        plab = np.column_stack([lab[:, 0], lab[:, 2], np.full(len(lab), 0.3)])
        px = (plab - plo) / (phi - plo) - 0.5
        spec = _np_mlp(pw, pb, px)
        return np.stack([np.interp(wave, wave_p, s) for s in spec])

    Jp = _np_jacobian(prior_on_data, x, eps=1e-4)     # the prior is float32 in the code; float64 here
    inside = np.all((labels[:, [0, 2]] >= plo[:2]) & (labels[:, [0, 2]] <= phi[:2]), axis=1)
    assert list(inside) == [bool(u) for u in use] and not inside[4]
    total = 0.0
    for i in range(n):
        A = F[i][:, None] * basis
        sw = np.sqrt(ivar[i])
        coef = np.linalg.lstsq(A * sw[:, None], flux[i] * sw, rcond=None)[0]
        chi2 = np.sum(ivar[i] * (flux[i] - (basis @ coef) * F[i]) ** 2)
        gterm = np.abs(J[i, [0, 2]] - Jp[i, [0, 2]]).sum() if inside[i] else 0.0
        total += chi2 + D * gterm
    expected = total / (n * 40)
    assert float(loss.detach()) == pytest.approx(expected, rel=2e-4)

    # The network's gradient spectra: by hand (PayneNet) == torch.func.jvp (any module) == finite differences.
    y1, g1 = value_and_gradients(net, T(x))

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(z)

    y2, g2 = value_and_gradients(Wrapped(net), T(x))
    np.testing.assert_allclose(g1.detach().numpy(), J, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g2.detach().numpy(), J, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(y1.detach().numpy(), F, rtol=1e-12)

    # The weights' gradient, with the continuum held at its optimum (envelope theorem), equals the
    # finite difference of the independently computed loss.
    loss.backward()
    w0 = net.layers[0].weight

    def np_loss_with(delta):
        W2 = [w.copy() for w in W]
        W2[0][2, 1] += delta
        F2 = _np_mlp(W2, B, x)
        J2 = _np_jacobian(lambda xx: _np_mlp(W2, B, xx), x)
        tot = 0.0
        for i in range(n):
            A = F2[i][:, None] * basis
            sw = np.sqrt(ivar[i])
            coef = np.linalg.lstsq(A * sw[:, None], flux[i] * sw, rcond=None)[0]
            tot += np.sum(ivar[i] * (flux[i] - (basis @ coef) * F2[i]) ** 2)
            if inside[i]:
                tot += D * np.abs(J2[i, [0, 2]] - Jp[i, [0, 2]]).sum()
        return tot / (n * 40)

    fd = (np_loss_with(1e-5) - np_loss_with(-1e-5)) / 2e-5
    assert float(w0.grad[2, 1]) == pytest.approx(fd, rel=1e-3)


# ------------------------------------------------------------------------------ a small run
def _labels(model, n, rng, correlated):
    lab = np.zeros((n, model.n_labels))
    col = [model.label_names.index(k) for k in LABELS]
    lab[:, col[0]] = rng.uniform(4300, 4700, n)
    lab[:, col[1]] = rng.uniform(1.5, 3.0, n)
    lab[:, col[2]] = rng.uniform(-1.0, 0.3, n)
    lab[:, col[3]] = (-0.25 * lab[:, col[2]] + rng.normal(0, 0.02, n)) if correlated else rng.uniform(-0.05, 0.22, n)
    return lab, col


def _window_mock(model, labels, seed, rv_max):
    from distlabels.mock import make_mock

    t, meta = make_mock(model, MockConfig(n=len(labels), snr_min=50, snr_max=50, seed=seed, rv_max_kms=rv_max,
                                          masked_fraction=0), labels=labels)
    wave = np.asarray(meta["wavelength_aa"])
    sel = (wave > WINDOW_AA[0]) & (wave < WINDOW_AA[1])
    n_pix = len(wave)
    flux = list_to_numpy(t.column("flux"), n_pix)[:, sel]
    ivar = list_to_numpy(t.column("ivar"), n_pix)[:, sel]
    return t, flux, ivar, wave[sel], meta["resolution"]


def _window_store(root, t, flux, ivar, wave, res, drop_labels: bool):
    """A real store of windowed mock spectra (true_* label columns dropped if asked: labels come from a table)."""
    cols = {c: t.column(c) for c in t.column_names if not (drop_labels and c.startswith("true_") and c != "true_rv")}
    cols.update(flux=list_column(flux), ivar=list_column(ivar), mask=list_column(np.zeros(flux.shape, bool), pa.bool_()))
    meta = {"survey": "mock", "wavelength_aa": wave.tolist(), "wavelength_medium": "vacuum", "rv_frame": "observed",
            "resolution": res, "segments": [list(s) for s in SEGMENTS]}
    return write_store(root, pa.table(cols), meta, max_rows_per_partition=200).root


@pytest.fixture(scope="module")
def small_run(bossbrain_model):
    """Reference stars with [Mg/M] following [M/H]; test stars off it; networks with and without the prior."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    ref, col = _labels(bossbrain_model, 300, rng, correlated=True)
    test, _ = _labels(bossbrain_model, 30, rng, correlated=False)
    t_ref, f_ref, i_ref, wave, res = _window_mock(bossbrain_model, ref, 11, 100.0)
    t_test, f_test, i_test, _, _ = _window_mock(bossbrain_model, test, 12, 0.0)
    ts = training_set_from_arrays(f_ref, i_ref, ref[:, col], LABELS, wave, resolution=res, segments=SEGMENTS,
                                  rv_kms=t_ref.column("true_rv").to_numpy())
    out = {}
    for name, D in (("none", 0.0), ("prior", 30.0)):
        cfg = DDPayneTrainConfig(hidden=(32, 32), epochs=40, batch_size=64, learning_rate=3e-3, gradient_weight=D,
                                 patience=1000, seed=0)
        out[name] = train_dd_payne(ts, bossbrain_model, cfg, progress=False)
    torch.set_num_threads(n_threads)
    return dict(models=out, ts=ts, test=test, col=col, wave=wave, res=res, f_test=f_test, i_test=i_test,
                t_ref=t_ref, f_ref=f_ref, i_ref=i_ref, ref=ref, t_test=t_test)


def test_prior_restores_the_gradient_spectrum_of_a_correlated_abundance(small_run, bossbrain_model):
    r = small_run
    wave, test, col = r["wave"], r["test"], r["col"]
    basis, _ = chebyshev_basis(wave, SEGMENTS, 3)
    f_true, g_true = gradient_spectra(bossbrain_model, test, LABELS, wave, "vacuum", r["res"])
    corr = {}
    for name, (m, rep) in r["models"].items():
        _, g = gradient_spectra(m, test[:, col], LABELS)
        corr[name] = np.median(gradient_correlation(g, g_true, f_true, basis), 0)
    k = LABELS.index("mgm")
    # Without the prior the network cannot tell Mg from [M/H]; with it, d flux / d[Mg/M] is the truth's.
    assert corr["prior"][k] > 0.85, corr
    assert corr["none"][k] < corr["prior"][k] - 0.3, corr
    # [M/H] and Teff are learned either way (the data constrain them).
    assert corr["none"][LABELS.index("mh")] > 0.8 and corr["prior"][LABELS.index("mh")] > 0.8, corr
    rep = r["models"]["prior"][1]
    assert rep.gradient_labels == LABELS and rep.n_outside_prior == 0
    assert 0.8 < rep.validation_chi2_per_pixel < 1.3, rep.summary()


def test_trained_model_round_trips_and_fits_through_the_kernel(small_run, tmp_path):
    from distlabels.config import FitConfig
    from distlabels.fit import fit_spectra

    r = small_run
    model, _ = r["models"]["prior"]
    model.save(tmp_path / "dd")
    back = load(tmp_path / "dd")
    assert isinstance(back, PayneMLP) and back.label_names == LABELS and back.resolution == r["res"]
    lab = r["test"][:5][:, r["col"]]
    np.testing.assert_allclose(back.predict(lab), model.predict(lab), rtol=1e-6)
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "dd").rglob("*"))
    res = fit_spectra(back, r["wave"], r["f_test"], r["i_test"], resolution=r["res"], segments=SEGMENTS,
                      config=FitConfig())
    truth = r["test"][:, r["col"]]
    ok = np.isfinite(res.labels).all(1)
    assert ok.all()
    d = res.labels - truth
    assert abs(np.median(d[:, 0])) < 60 and np.std(d[:, 0]) < 120, d[:, 0]          # Teff, K
    assert np.std(d[:, 2]) < 0.1, d[:, 2]                                             # [M/H]
    # [Mg/M] off the reference correlation is still measured (slope of fitted vs true well above 0).
    slope = np.polyfit(truth[:, 3], res.labels[:, 3], 1)[0]
    assert slope > 0.5, slope


def test_cli_trains_from_a_label_table_and_the_model_fits_on_a_local_cluster(small_run, bossbrain_model_dir,
                                                                              tmp_path, one_thread):
    """`distlabels train dd-payne` on a store + a label table joined on source_id (store without label
    columns), then `distlabels fit` of other stars on a real LocalCluster: every star exactly once."""
    from distlabels.cli.main import main

    r = small_run
    ref_store = _window_store(tmp_path / "ref", r["t_ref"], r["f_ref"], r["i_ref"], r["wave"], r["res"], True)
    ids = r["t_ref"].column("source_id").to_pylist()
    table = {"source_id": ids[::-1]}                       # another order than the store's: the join must match
    for j, name in zip(r["col"], LABELS):
        table[name] = r["ref"][::-1, j]
    table["mgm"][:3] = np.nan                              # three stars without every label: left out, counted
    pq.write_table(pa.table(table), tmp_path / "labels.parquet")
    out = tmp_path / "dd"
    argv = ["train", "dd-payne", "--spectra", str(ref_store), "--labels", ",".join(LABELS), "--label-table",
            str(tmp_path / "labels.parquet"), "--rv-column", "true_rv", "--prior", str(bossbrain_model_dir),
            "--hidden", "16", "--epochs", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    m = load(out)
    assert isinstance(m, PayneMLP) and m.label_names == LABELS and len(m.training_labels) == 297
    # The joined labels are the table's, star by star (the training labels are the reference labels).
    ref = r["ref"][:, r["col"]]
    keep = np.isfinite(np.asarray(table["mgm"])[::-1])
    np.testing.assert_allclose(np.sort(m.training_labels[:, 0]), np.sort(ref[keep, 0]))
    assert main(argv) == 2                                 # --out exists: refused in one line
    test_store = _window_store(tmp_path / "test", r["t_test"], r["f_test"], r["i_test"], r["wave"], r["res"], False)
    cat = tmp_path / "cat"
    assert main(["fit", "--model", str(out), "--spectra", str(test_store), "--out", str(cat), "--workers", "1",
                 "--task-rows", "20", "--no-progress"]) == 0
    got = pq.read_table(cat / "dataset", columns=["source_id", "teff", "flags"])
    assert sorted(got.column("source_id").to_pylist()) == sorted(r["t_test"].column("source_id").to_pylist())
    assert np.isfinite(got.column("teff").to_numpy()).all()


def _subset(ts, n):
    from dataclasses import replace

    return replace(ts, flux=ts.flux[:n], ivar=ts.ivar[:n], labels=ts.labels[:n], source_id=ts.source_id[:n],
                   rv_kms=ts.rv_kms[:n])


def test_prior_computed_per_batch_equals_cached(small_run, bossbrain_model, one_thread):
    """Large reference sets compute the prior's gradients per minibatch instead of caching them: same weights."""
    ts = _subset(small_run["ts"], 60)
    base = dict(hidden=(8,), epochs=2, batch_size=16, gradient_weight=30.0)
    cached, _ = train_dd_payne(ts, bossbrain_model, DDPayneTrainConfig(**base), progress=False)
    per_batch, _ = train_dd_payne(ts, bossbrain_model, DDPayneTrainConfig(prior_cache_mb=0, **base), progress=False)
    for a, b in zip(cached.weights, per_batch.weights):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dd_payne_trains_on_cuda_like_on_cpu(small_run, bossbrain_model):
    ts = _subset(small_run["ts"], 60)
    cfg = DDPayneTrainConfig(hidden=(8,), epochs=2, batch_size=16, gradient_weight=30.0)
    m_cpu, r_cpu = train_dd_payne(ts, bossbrain_model, cfg, device="cpu", progress=False)
    m_gpu, r_gpu = train_dd_payne(ts, bossbrain_model, cfg, device="cuda", progress=False)
    assert r_gpu.device.startswith("cuda")
    assert r_gpu.loop.history[0]["train_loss"] == pytest.approx(r_cpu.loop.history[0]["train_loss"], rel=1e-3)
    lab = ts.labels[:5]
    np.testing.assert_allclose(m_gpu.predict(lab), m_cpu.predict(lab), atol=2e-3)


def test_resume_continues_exactly(small_run, bossbrain_model, tmp_path, one_thread):
    """3 epochs, stop, resume to 6 == 6 epochs straight (checkpoints as in train/payne.py)."""
    ts = _subset(small_run["ts"], 60)
    base = dict(hidden=(8,), batch_size=16, gradient_weight=30.0, checkpoint_every=1)
    straight, _ = train_dd_payne(ts, bossbrain_model, DDPayneTrainConfig(epochs=6, **base), out_dir=tmp_path / "a",
                                 progress=False)
    train_dd_payne(ts, bossbrain_model, DDPayneTrainConfig(epochs=3, **base), out_dir=tmp_path / "b", progress=False)
    resumed, rep = train_dd_payne(ts, bossbrain_model, DDPayneTrainConfig(epochs=6, **base), out_dir=tmp_path / "b",
                                  resume=True, progress=False)
    assert rep.loop.epochs_run == 6 and len(rep.loop.history) == 6
    for a, b in zip(straight.weights, resumed.weights):
        assert torch.equal(a, b)
