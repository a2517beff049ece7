"""TransformerPayne as an emulator kind: any-grid evaluation, chunking, Jacobian, kernel folding, persistence.

The network here is untrained (seeded random weights): these are properties of the architecture and
of the code around it, checked against independent computations (a full-grid evaluation, central
finite differences in float64, a dense matrix product).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from distlabels.errors import ModelFormatError
from distlabels.models import TransformerPayne, load, registered_kinds
from distlabels.models.transformer_payne import TransformerPayneNet, _period_grid

WAVE = 10 ** (np.log10(5000.0) + 1e-4 * np.arange(300))     # 300 px, LAMOST-like log step
NAMES = ("teff", "logg", "mh")


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors run faster on one thread (and do not fight the suite's other tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0, d=32, wave=WAVE) -> TransformerPayne:
    torch.manual_seed(seed)
    ln_ref, periods = _period_grid(wave, 16)
    net = TransformerPayneNet(3, d_model=d, n_tokens=4, n_heads=4, n_blocks=2, token_hidden=32, n_freq=16,
                              ln_ref=ln_ref, periods=periods)
    with torch.no_grad():   # larger output weights than the default init: a spectrum with structure
        net.head.weight.mul_(20)
    return TransformerPayne(net, label_names=NAMES, x_min=[4000, 1.0, -1.0], x_max=[5000, 3.5, 0.4],
                            wavelength_aa=wave, wavelength_medium="vacuum",
                            training_labels=np.array([[4500, 2.0, -0.3], [4200, 3.0, 0.1]]),
                            model_variance=np.linspace(1e-6, 2e-6, len(wave))).eval()


def test_registered_kind():
    assert "transformer-payne" in registered_kinds()


def test_subset_of_the_grid_equals_the_full_grid_at_those_pixels():
    m = make_model()
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) - 0.5
    with torch.no_grad():
        full = m(x)
        sub_idx = np.sort(np.random.default_rng(2).choice(len(WAVE), 37, replace=False))
        sub = m.on_grid(WAVE[sub_idx])(x)
    assert full.std() > 1e-3          # not a constant output
    np.testing.assert_allclose(sub.numpy(), full[:, sub_idx].numpy(), rtol=0, atol=2e-6)
    # predict() on another grid evaluates there directly: equal to the full grid at the shared pixels.
    lab = np.array([[4600.0, 2.2, -0.4]])
    np.testing.assert_allclose(m.predict(lab, WAVE[sub_idx]), m.predict(lab)[:, sub_idx], atol=2e-6)
    # outside the training wavelengths: NaN, not an extrapolation
    out = m.predict(lab, [4000.0, WAVE[10]])
    assert np.isnan(out[0, 0]) and np.isfinite(out[0, 1])


def test_pixel_chunking_does_not_change_the_result():
    m = make_model()
    x = torch.rand(4, 3, generator=torch.Generator().manual_seed(3)) - 0.5
    with torch.no_grad():
        ref, ref_s = m(x), m.value_and_jacobian_stacked(x)
        m.max_chunk_elements = 4 * 32 * 2 * 4 * 70     # chunks of 70 pixels (4 stars, 3 tangents + value)
        assert m._chunk(4, tangents=4) == 70 and m._chunk(4) == 280
        np.testing.assert_allclose(m(x).numpy(), ref.numpy(), atol=2e-6)
        np.testing.assert_allclose(m.value_and_jacobian_stacked(x).numpy(), ref_s.numpy(), atol=2e-6)


def test_jacobian_matches_central_finite_differences():
    m = make_model().double()
    x = (torch.rand(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 0.5) * 0.8
    with torch.no_grad():
        s = m.value_and_jacobian_stacked(x)            # (n, 1 + L, n_pix)
        np.testing.assert_allclose(s[:, 0].numpy(), m(x).numpy(), atol=1e-12)
        h = 1e-5
        for j in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[j] = h
            fd = (m(x + e) - m(x - e)) / (2 * h)
            np.testing.assert_allclose(s[:, 1 + j].numpy(), fd.numpy(), atol=1e-7 * float(fd.abs().max()) + 1e-9)


def test_kernel_folding_equals_the_dense_reference():
    """project(P).with_inputs(M, o) == P @ flux(o + theta M^T), with the Jacobian to match."""
    m = make_model().double()
    rng = np.random.default_rng(5)
    P = sp.random(40, len(WAVE), density=0.02, format="coo", random_state=6)
    mat, off = rng.normal(size=(3, 2)) * 0.3, rng.uniform(-0.2, 0.2, 3)
    Pt = torch.sparse_coo_tensor(np.vstack([P.row, P.col]), P.data, size=P.shape, dtype=torch.float64,
                                 check_invariants=True)
    folded = m.project(Pt).with_inputs(mat, off).double()
    theta = torch.as_tensor(rng.uniform(-0.3, 0.3, (4, 2)))
    with torch.no_grad():
        x = torch.as_tensor(off) + theta @ torch.as_tensor(mat).T
        ref = torch.as_tensor(P.toarray()) @ m(x).T                       # (40, n)
        got = folded.value_and_jacobian_stacked(theta)                   # (n, 3, 40)
        np.testing.assert_allclose(got[:, 0].numpy(), ref.T.numpy(), atol=1e-10)
        np.testing.assert_allclose(folded(theta).numpy(), ref.T.numpy(), atol=1e-10)
        _, jx = m.value_and_jacobian(x)                                  # (n, n_pix, 3)
        jref = torch.einsum("op,npl,lk->nko", torch.as_tensor(P.toarray()), jx, torch.as_tensor(mat))
        np.testing.assert_allclose(got[:, 1:].numpy(), jref.numpy(), atol=1e-10)
    # the projection reads only the model pixels it needs
    assert folded.base.n_pix == len(np.unique(P.col))


def test_save_load_round_trip(tmp_path):
    m = make_model(seed=7)
    m.save(tmp_path / "tp")
    meta = json.loads((tmp_path / "tp" / "model.json").read_text())
    assert meta["kind"] == "transformer-payne" and meta["architecture"]["d_model"] == 32
    back = load(tmp_path / "tp")
    assert isinstance(back, TransformerPayne) and back.label_names == NAMES
    np.testing.assert_array_equal(back.wavelength, WAVE)
    np.testing.assert_allclose(back.model_variance.numpy(), m.model_variance.numpy())
    np.testing.assert_array_equal(back.training_labels, m.training_labels)
    lab = np.array([[4300.0, 1.5, 0.0], [4900.0, 3.2, -0.8]])
    np.testing.assert_array_equal(back.predict(lab), m.predict(lab))
    assert back.meta["training_wavelength_range_aa"] == pytest.approx([WAVE[0], WAVE[-1]])
    assert back.model_id.startswith("transformer-payne-")


def test_malformed_model_dir_is_one_sentence(tmp_path):
    m = make_model()
    m.save(tmp_path / "tp")
    meta = json.loads((tmp_path / "tp" / "model.json").read_text())
    del meta["architecture"]["n_tokens"]
    (tmp_path / "tp" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="n_tokens"):
        load(tmp_path / "tp")
