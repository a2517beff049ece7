"""The training and Cannon test-step code paths on CUDA (skipped without a GPU): same answers as on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distlabels.config import CannonTrainConfig, FitConfig, PayneTrainConfig
from distlabels.fit.cannon import CannonFitter
from distlabels.train.cannon import train_cannon, training_set_from_arrays
from distlabels.train.payne import train_payne
from tests.conftest import CANNON_LABELS, draw_labels, quadratic_flux, quadratic_truth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _data(n, seed, n_pix=400):
    theta, pivot, scale, wave = quadratic_truth(n_pix)
    rng = np.random.default_rng(seed)
    lab = draw_labels(n, rng)
    flux = quadratic_flux(theta, pivot, scale, lab) + rng.normal(0, 0.01, (n, n_pix))
    return lab, flux, np.full(flux.shape, 1e4), wave


def test_cannon_train_and_fit_on_cuda_match_cpu():
    lab, flux, ivar, wave = _data(300, 1)
    ts = training_set_from_arrays(flux, ivar, lab, CANNON_LABELS, wave)
    cfg = CannonTrainConfig(normalise="none")
    m_cpu, _ = train_cannon(ts, cfg, device="cpu")
    m_gpu, _ = train_cannon(ts, cfg, device="cuda")
    np.testing.assert_allclose(m_gpu.theta.double().numpy(), m_cpu.theta.double().numpy(), atol=1e-8)
    np.testing.assert_allclose(m_gpu.model_variance.numpy(), m_cpu.model_variance.numpy(), rtol=1e-5, atol=1e-12)
    lt, ft, it, _ = _data(50, 2)
    for rv_free in (False, True):
        cfg_fit = FitConfig(v_max_kms=200 if rv_free else 0)
        r_cpu = CannonFitter(m_cpu, wave, config=cfg_fit, device="cpu").fit(ft, it)
        r_gpu = CannonFitter(m_cpu, wave, config=cfg_fit, device="cuda").fit(ft, it)
        np.testing.assert_array_less(np.abs(r_gpu.labels - r_cpu.labels), 1e-2 * r_cpu.errors)


def test_payne_trains_on_cuda():
    lab, flux, ivar, wave = _data(300, 3, n_pix=200)
    ts = training_set_from_arrays(flux, ivar, lab, CANNON_LABELS, wave)
    model, rep = train_payne(ts, PayneTrainConfig(hidden=(32, 32), epochs=30, batch_size=64), device="cuda",
                             progress=False)
    assert rep.device.startswith("cuda") and np.isfinite(rep.validation_mae)
    assert rep.loop.history[-1]["val"] < rep.loop.history[0]["val"]
