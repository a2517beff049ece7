"""The Cannon as an emulator kind: label vector, analytic Jacobian, persistence, projection, and the
general fit kernel running it."""
from __future__ import annotations

import json

import numpy as np
import torch

from distlabels.config import FitConfig
from distlabels.fit import fit_spectra
from distlabels.models import CannonModel, load
from distlabels.models.cannon import label_vector, label_vector_jacobian, n_terms
from distlabels.models.continuum import PseudoContinuum
from tests.conftest import CANNON_LABELS, draw_labels, quadratic_flux, quadratic_truth


def _model(theta, pivot, scale, wave, **kw):
    rng = np.random.default_rng(5)
    tl = draw_labels(200, rng)
    return CannonModel(torch.as_tensor(theta), pivot=pivot, scale=scale, label_names=CANNON_LABELS,
                       x_min=tl.min(0), x_max=tl.max(0), wavelength_aa=wave, wavelength_medium="vacuum",
                       training_labels=tl, **kw)


def test_label_vector_terms_and_derivative():
    u = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    a, b, c = 0.3, -0.2, 0.5
    expect = [1, a, b, c, a * a, a * b, a * c, b * b, b * c, c * c]   # 1, linear, i <= j row-major
    np.testing.assert_allclose(label_vector(u)[0].numpy(), expect)
    assert n_terms(3) == 10 and n_terms(7) == 36
    jac = label_vector_jacobian(u)[0].numpy()
    h = 1e-6
    for k in range(3):
        du = torch.zeros_like(u)
        du[0, k] = h
        fd = (label_vector(u + du) - label_vector(u - du))[0].numpy() / (2 * h)
        np.testing.assert_allclose(jac[:, k], fd, atol=1e-9)


def test_forward_matches_formula_and_jacobian_matches_autograd():
    theta, pivot, scale, wave = quadratic_truth(120)
    m = _model(theta, pivot, scale, wave)
    rng = np.random.default_rng(2)
    lab = draw_labels(5, rng)
    np.testing.assert_allclose(m.predict(lab), quadratic_flux(theta, pivot, scale, lab), rtol=1e-12)
    x = m.scale(torch.as_tensor(lab))
    y, jac = m.value_and_jacobian(x)
    # Independent reference: autograd through forward(), one star at a time.
    jac_ref = torch.stack([torch.autograd.functional.jacobian(lambda xi: m(xi[None])[0], xi) for xi in x])
    np.testing.assert_allclose(jac.numpy(), jac_ref.numpy(), rtol=1e-10, atol=1e-12)
    # Projection: the model of M @ flux is M @ (model flux).
    M = torch.as_tensor(rng.normal(size=(7, 120)))
    np.testing.assert_allclose(m.project(M)(x).numpy(), (M @ y.T).T.numpy(), rtol=1e-10, atol=1e-12)


def test_save_load_roundtrip(tmp_path):
    theta, pivot, scale, wave = quadratic_truth(80)
    mask = np.zeros(80, bool)
    mask[::7] = True
    pc = PseudoContinuum(wave, mask, ((5000.0, 5500.0), (5500.0, 6000.0)), degree=2)
    s2 = np.full(80, 4e-6)
    G = np.eye(10) * 1e-3
    m = _model(theta, pivot, scale, wave, continuum=pc, model_variance=s2, theta_cov=(G, np.full(80, 2e-4)),
               label_systematic_error=[10.0, 0.02, 0.01])
    m.save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "model.json").read_text())
    assert meta["kind"] == "cannon" and meta["architecture"]["normalisation"]["degree"] == 2
    back = load(tmp_path / "c")
    assert isinstance(back, CannonModel) and back.label_names == CANNON_LABELS
    lab = draw_labels(4, np.random.default_rng(3))
    np.testing.assert_allclose(back.predict(lab), m.predict(lab), rtol=1e-6)   # float32 in memory after load
    np.testing.assert_allclose(back.model_variance.numpy(), s2, rtol=1e-6)
    assert np.array_equal(back.continuum.mask, mask) and back.continuum.segments == pc.segments
    np.testing.assert_allclose(back.theta_cov_ref, G)
    np.testing.assert_allclose(back.label_systematic_error, [10.0, 0.02, 0.01])


def test_general_kernel_fits_a_cannon_model():
    """The general fit kernel (labels + RV + continuum by LM) runs a Cannon model unchanged."""
    theta, pivot, scale, wave = quadratic_truth(400)
    m = _model(theta, pivot, scale, wave)
    rng = np.random.default_rng(4)
    lab = draw_labels(6, rng, ((4300, 4700), (1.5, 2.5), (-0.8, -0.2)))
    flux = quadratic_flux(theta, pivot, scale, lab)
    # The kernel shifts the model by linear interpolation on its working grid, which smooths a
    # model sampled as coarsely as the data; a narrow RV range keeps that effect small here.
    res = fit_spectra(m, wave, flux, np.full_like(flux, 1e4), config=FitConfig(continuum_degree=-1, v_max_kms=2))
    sigma = (res.labels - lab) / res.errors
    assert np.all(np.abs(sigma) < 0.2), sigma           # noiseless: on the truth to a fraction of an error
    assert np.all(res.chi2_red < 0.05) and np.all(np.abs(res.rv) < 1)
