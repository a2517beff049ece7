"""The Payne's 2018-19 per-pixel networks: import (layout from shapes), forward and Jacobian against the
published formula in numpy float64, the fit's folding (label map, projection), persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from distlabels.cli.main import main
from distlabels.errors import ModelFormatError
from distlabels.models import PerPixelPayne, load
from distlabels.models.importers import import_payne_npz


def _reference(labels, arr):
    """flux_p = sum_k w1[p,k] sigmoid(sum_j w0[p,k,j] x_j + b0[p,k]) + b1[p], float64: (n, n_pix)."""
    x = (np.atleast_2d(labels) - arr["x_min"]) / (arr["x_max"] - arr["x_min"]) - 0.5
    z = np.einsum("pkj,nj->npk", arr["w_array_0"].astype(np.float64), x) + arr["b_array_0"]
    return (arr["w_array_1"] / (1 + np.exp(-z))).sum(-1) + arr["b_array_1"]


def _reference_jacobian(labels, arr, eps=1e-6):
    """d flux / d scaled label by central differences of the reference: (n, n_labels, n_pix)."""
    span = arr["x_max"] - arr["x_min"]
    out = []
    for j in range(len(span)):
        d = np.zeros(len(span))
        d[j] = eps * span[j]
        out.append((_reference(labels + d, arr) - _reference(labels - d, arr)) / (2 * eps))
    return np.stack(out, 1)


def _arrays(n_pix=120, n_hidden=5, n_labels=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"w_array_0": rng.normal(0, 1.5, (n_pix, n_hidden, n_labels)).astype(np.float32),
            "b_array_0": rng.normal(0, 0.5, (n_pix, n_hidden)).astype(np.float32),
            "w_array_1": rng.normal(0, 0.1, (n_pix, n_hidden)).astype(np.float32),
            "b_array_1": (1 + rng.normal(0, 0.05, n_pix)).astype(np.float32),
            "x_min": np.array([4000.0, 1.0, -1.0, -0.2]), "x_max": np.array([6000.0, 5.0, 0.5, 0.6])}


def _save(tmp_path, arr, name="net.npz"):
    p = tmp_path / name
    np.savez(p, **arr)
    return p


def _labels(arr, n, seed=1):
    rng = np.random.default_rng(seed)
    return arr["x_min"] + rng.uniform(0.05, 0.95, (n, len(arr["x_min"]))) * (arr["x_max"] - arr["x_min"])


def test_per_pixel_import_matches_the_formula_and_round_trips(tmp_path):
    arr = _arrays()
    wave = np.linspace(15200.0, 16900.0, 120)
    cont = np.zeros(120, bool)
    cont[::7] = True
    out = import_payne_npz(_save(tmp_path, arr), tmp_path / "m", wavelength=wave, continuum_pixels=cont,
                           bad_pixels=~cont, label_names=["teff", "logg", "feh", "alphafe"], resolution=22500)
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "payne-perpixel" and meta["architecture"]["activation"] == "sigmoid"
    assert meta["flux_normalization"]["output"] == "pseudo-continuum-normalised"
    m = load(out)
    assert isinstance(m, PerPixelPayne) and m.resolution == 22500 and m.n_hidden == 5
    np.testing.assert_array_equal(m.continuum_pixels, cont)
    np.testing.assert_array_equal(m.bad_pixels, ~cont)
    lab = _labels(arr, 6)
    np.testing.assert_allclose(m.predict(lab), _reference(lab, arr), atol=2e-6)
    # Jacobian with respect to scaled labels, from the closed form, against finite differences.
    x = m.scale(torch.as_tensor(lab))
    st = m.value_and_jacobian_stacked(x.float()).double().numpy()
    np.testing.assert_allclose(st[:, 0], _reference(lab, arr), atol=2e-6)
    np.testing.assert_allclose(st[:, 1:], _reference_jacobian(lab, arr), atol=2e-4)
    y, jac = m.value_and_jacobian(x.float())
    np.testing.assert_allclose(jac.transpose(1, 2).numpy(), st[:, 1:], atol=1e-7)
    # Saving again gives the same weights (and loads to the same model).
    again = load(m.save(tmp_path / "again"))
    np.testing.assert_array_equal(again.w0.numpy(), m.w0.numpy())


def test_folded_label_map_and_projection_equal_the_unfolded_model(tmp_path):
    arr = _arrays(seed=3)
    m = load(import_payne_npz(_save(tmp_path, arr), tmp_path / "m", wavelength=np.arange(1.0, 121.0))).double()
    rng = np.random.default_rng(4)
    # Fit 2 parameters: labels 0 and 1 tied to theta0, label 2 = theta1, label 3 fixed.
    M = np.array([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 0.0]])
    off = np.array([0.0, 0.0, 0.0, 0.2])
    theta = torch.as_tensor(rng.uniform(-0.4, 0.4, (5, 2)))
    x = torch.as_tensor(off) + theta @ torch.as_tensor(M).T
    folded = m.with_inputs(M, off)
    np.testing.assert_allclose(folded(theta).numpy(), m(x).numpy(), atol=1e-12)
    jx = m.value_and_jacobian_stacked(x)
    np.testing.assert_allclose(folded.value_and_jacobian_stacked(theta)[:, 1:].numpy(),
                               torch.einsum("nlp,lk->nkp", jx[:, 1:], torch.as_tensor(M)).numpy(), atol=1e-12)
    # A pixel selection keeps only those networks; a general sparse matrix is applied to the output.
    sel = sp.csr_matrix((np.ones(30), (np.arange(30), np.arange(40, 70))), shape=(30, 120))
    ps = m.project(sel)
    assert ps.projection is None and ps.n_net_pix == 30
    dense = np.random.default_rng(5).uniform(0, 1, (25, 120)) * (np.random.default_rng(6).uniform(size=(25, 120)) < 0.05)
    pg = m.project(sp.csr_matrix(dense)).with_inputs(M, off)
    for proj, mat in ((ps.with_inputs(M, off), sel.toarray()), (pg, dense)):
        st = proj.value_and_jacobian_stacked(theta).numpy()
        ref = folded.value_and_jacobian_stacked(theta).numpy() @ mat.T
        np.testing.assert_allclose(st, ref, atol=1e-10)


def test_malformed_per_pixel_files_get_one_sentence_errors(tmp_path):
    arr = _arrays()
    wave = np.arange(1.0, 121.0)
    cases = [({k: v for k, v in arr.items() if k != "b_array_1"}, "no b_array_1"),
             (arr | {"w_array_1": arr["w_array_1"][:, :3]}, "w_array_1 is"),
             (arr | {"b_array_0": arr["b_array_0"].T}, "b_array_0 is"),
             (arr | {"x_min": arr["x_min"][:2]}, "x_min"),
             (arr | {"w_array_2": np.zeros((3, 3))}, "third layer")]
    for i, (a, msg) in enumerate(cases):
        with pytest.raises(ModelFormatError, match=msg):
            import_payne_npz(_save(tmp_path, a, f"bad{i}.npz"), tmp_path / f"m{i}", wavelength=wave)
        assert not (tmp_path / f"m{i}").exists()
    with pytest.raises(ModelFormatError, match="boolean array of the network's 120 pixels"):
        import_payne_npz(_save(tmp_path, arr), tmp_path / "mm", wavelength=wave, bad_pixels=np.ones(7, bool))


def test_real_network_import_through_the_cli(tmp_path, shared_data, capsys):
    """The published APOGEE dwarf network: the CLI import agrees with the numpy formula on its own arrays."""
    d = shared_data
    rc = main(["models", "import", "payne-npz", str(d / "payne_apogee_dwarf_nn.npz"),
               "--wavelength", str(d / "apogee_wavelength.npz"), "--pixel-mask", str(d / "apogee_mask.npz"),
               "--continuum-pixels", str(d / "apogee_cannon_continuum_pixels.npz"), "--out", str(tmp_path / "m")])
    assert rc == 0 and "payne-perpixel" in capsys.readouterr().out
    m = load(tmp_path / "m")
    assert m.label_names == ("teff", "logg", "feh", "alphafe", "vmacro") and m.n_pix == 7214
    assert m.resolution == 22500 and m.wavelength_medium == "vacuum"
    assert m.bad_pixels.sum() == 875 and m.continuum_pixels.sum() == 529
    with np.load(d / "payne_apogee_dwarf_nn.npz") as z:
        arr = {k: z[k] for k in z.files}
    lab = np.array([[4500.0, 4.6, -0.3, 0.1, 3.0], [6200.0, 4.1, 0.2, -0.1, 12.0]])
    np.testing.assert_allclose(m.predict(lab), _reference(lab, arr), atol=3e-6)
