"""Cannon training against analytic truth: coefficients of a known quadratic model, the intrinsic
scatter below the noise, L1 optimality, and the training-noise debiasing of the test step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distlabels.config import CannonTrainConfig, FitConfig
from distlabels.fit.cannon import CannonFitter
from distlabels.models.cannon import label_vector
from distlabels.train.cannon import admm_l1, normal_equations, packed_outer, train_cannon, training_set_from_arrays
from tests.conftest import CANNON_LABELS, draw_labels, quadratic_flux, quadratic_truth

SIGMA = 0.01   # noise per pixel (S/N 100)


def _train_set(n, seed, s_true=0.0, snr_range=None, n_pix=300):
    theta, pivot, scale, wave = quadratic_truth(n_pix)
    rng = np.random.default_rng(seed)
    lab = draw_labels(n, rng)
    sig = np.full((n, 1), SIGMA) if snr_range is None else 1 / rng.uniform(*snr_range, (n, 1))
    flux = quadratic_flux(theta, pivot, scale, lab)
    flux = flux + rng.normal(size=flux.shape) * sig + rng.normal(size=flux.shape) * s_true
    ivar = np.broadcast_to(1 / sig**2, flux.shape)
    return training_set_from_arrays(flux, ivar, lab, CANNON_LABELS, wave), theta


def test_recovers_generating_coefficients():
    """theta equals per-pixel least squares (numpy) and sits on the truth within its covariance."""
    ts, theta_true = _train_set(600, seed=1)
    model, rep = train_cannon(ts, CannonTrainConfig(normalise="none", scatter="none"))
    th = model.theta.detach().double().numpy()
    u = (ts.labels - model.pivot) / model.scale_u
    V = label_vector(torch.as_tensor(u)).numpy()
    # Independent reference: numpy's least squares per pixel (equal weights here).
    ref = np.linalg.lstsq(V, ts.flux.astype(np.float64), rcond=None)[0].T
    np.testing.assert_allclose(th, ref, atol=1e-9)
    # The truth is expressed in the trained model's vectorizer (its own pivot/scale): refit the
    # noiseless truth in that basis, then d^T A d per pixel is chi^2 with T degrees of freedom.
    theta0, pivot0, scale0, _ = quadratic_truth(300)
    noiseless = quadratic_flux(theta0, pivot0, scale0, ts.labels)
    truth = np.linalg.lstsq(V, noiseless, rcond=None)[0].T
    d = th - truth
    A = V.T @ V / SIGMA**2
    chi2 = np.einsum("pi,ij,pj->p", d, A, d)
    T = V.shape[1]
    assert abs(chi2.mean() / T - 1) < 0.1, chi2.mean() / T
    assert rep.n_dead_pixels == 0 and rep.n_terms == 10


@pytest.mark.parametrize("snr_range", [None, (50.0, 200.0)], ids=["equal-snr", "mixed-snr"])
def test_scatter_below_noise_is_recovered(snr_range):
    """True s = 0.4 x noise: maximum likelihood finds it; the median-chi^2 rule gives 0."""
    s_true = 0.4 * SIGMA if snr_range is None else 0.004
    ts, _ = _train_set(2000, seed=2, s_true=s_true, snr_range=snr_range, n_pix=200)
    model, _ = train_cannon(ts, CannonTrainConfig(normalise="none"))
    s = np.sqrt(model.model_variance.numpy())
    assert abs(np.median(s) / s_true - 1) < 0.05, np.median(s)
    # Casey et al.'s rule: the scatter that makes median(chi^2) = 1 over the training stars.
    resid = ts.flux - model.predict(ts.labels)
    chi2_0 = resid**2 * ts.ivar
    assert np.median(np.median(chi2_0, axis=0)) < 1   # already below 1 at s = 0: the rule returns 0


def test_l1_solution_is_optimal_and_sparse():
    """ADMM's answer satisfies the lasso optimality conditions, and with the strength chosen on
    validation stars the pure-noise coefficients are mostly set to exactly zero."""
    rng = np.random.default_rng(3)
    theta, pivot, scale, wave = quadratic_truth(200)
    theta[:, 4:] = 0                                         # no quadratic terms at all
    lab = draw_labels(400, rng)
    flux = quadratic_flux(theta, pivot, scale, lab) + rng.normal(0, SIGMA, (400, 200))
    ts = training_set_from_arrays(flux, np.full(flux.shape, SIGMA**-2), lab, CANNON_LABELS, wave)
    model, rep = train_cannon(ts, CannonTrainConfig(normalise="none", scatter="none", l1=(10.0, 100.0, 1000.0)))
    chosen = model.l1_regularization
    assert (chosen > 0).mean() > 0.5 and sum(rep.l1_choice.values()) == 200
    th = model.theta.detach().double().numpy()
    assert (np.abs(th[chosen > 0, 4:]) < 1e-12).mean() > 0.5
    # KKT conditions of min th^T A th - 2 b^T th + lam |th[1:]| on the solver's own output.
    u = torch.as_tensor((lab - model.pivot) / model.scale_u)
    v = label_vector(u)
    A, b = normal_equations(packed_outer(v), v, torch.as_tensor(flux[:, :3]),
                            torch.full((400, 3), SIGMA**-2, dtype=torch.float64))
    lam = torch.full((3,), 300.0, dtype=torch.float64)
    sol = admm_l1(A, b, lam, torch.zeros(3, 10, dtype=torch.float64), n_iter=3000, tol=1e-10)
    grad = 2 * (A @ sol[..., None])[..., 0] - 2 * b
    nz = sol[:, 1:].abs() > 1e-9
    scale_g = float(lam[0])
    assert torch.all((grad[:, 1:] + lam[:, None] * torch.sign(sol[:, 1:]))[nz].abs() < 1e-3 * scale_g)
    assert torch.all(grad[:, 1:][~nz].abs() <= lam[:, None].expand_as(nz)[~nz] * (1 + 1e-3))
    assert grad[:, 0].abs().max() < 1e-3 * scale_g


def test_debiased_test_step_removes_training_noise_bias():
    """Noise in a small training set pulls a plain chi^2 fit towards the training set's centre (the
    model's own noise is largest far from it). The debiased test step removes most of that: smaller
    scatter about the truth and pulls near 1, where the plain fit's are far above."""
    ts, _ = _train_set(150, seed=4, n_pix=3000)
    model, _ = train_cannon(ts, CannonTrainConfig(normalise="none"))
    theta, pivot, scale, wave = quadratic_truth(3000)
    rng = np.random.default_rng(5)
    lab = draw_labels(200, rng, ((4200, 4800), (1.2, 2.8), (-0.9, -0.1)))
    flux = quadratic_flux(theta, pivot, scale, lab) + rng.normal(0, SIGMA, (200, 3000))
    ivar = np.full(flux.shape, SIGMA**-2)
    pull, scatter = {}, {}
    for debias in (True, False):
        r = CannonFitter(model, wave, config=FitConfig(v_max_kms=0), debias=debias).fit(flux, ivar)
        pull[debias] = ((r.labels - lab) / r.errors).std(0)
        scatter[debias] = (r.labels - lab).std(0)
    assert np.all(pull[True] < 1.25), pull
    assert np.all(pull[False] > pull[True] + 0.3), pull
    assert np.all(scatter[True] < 0.85 * scatter[False]), scatter
