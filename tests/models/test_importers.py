"""Importers: bossbrain's pickled networks and The Payne's npz become PayneMLP model directories."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distlabels.errors import DistlabelsError, ModelFormatError
from distlabels.models import Emulator, PayneMLP, load
from distlabels.models.importers import import_bossbrain, import_payne_npz
from distlabels.models.safe_pickle import safe_load


# ----- independent float64 reference -----------------------------------------------------------
def _payne_forward(labels, weights, biases, x_min, x_max, slope=0.01):
    """The Payne formula in numpy float64: labels (n, L) -> flux (n, n_pix)."""
    h = (np.atleast_2d(labels) - x_min) / (x_max - x_min) - 0.5
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        if i < len(weights) - 1:
            h = np.where(h > 0, h, slope * h)
    return h


def _assert_rel(got, ref, rel=1e-5):
    """Per spectrum: max |got - ref| <= rel * max |ref| (flux passes through zero in deep lines)."""
    err = np.abs(got - ref).max(axis=1)
    scale = np.abs(ref).max(axis=1)
    assert np.all(err <= rel * scale), (err / scale).max()


# ----- bossbrain ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_bossbrain():
    """The 4000-5000 network read straight from the pickle records (not through importers.py)."""
    pytest.importorskip("bossbrain")
    import importlib.resources

    p = Path(str(importlib.resources.files("bossbrain").joinpath("data", "ann_22pars_4000-5000.pkl")))
    em = safe_load(p).state
    seq = em["model"].state["_modules"]["features"].state["_modules"]
    return dict(w=[seq[k].state["_parameters"]["weight"].numpy() for k in "024"],
                b=[seq[k].state["_parameters"]["bias"].numpy() for k in "024"],
                slope=seq["1"].state["negative_slope"], xmin=em["xmin"], xmax=em["xmax"],
                names=list(em["label_names"]), train=em["training_labels"])


@pytest.fixture(scope="module")
def bossbrain_dir(tmp_path_factory, raw_bossbrain):
    return import_bossbrain("4000-5000", tmp_path_factory.mktemp("bb") / "model")


def _label_sets(raw, n_train=64, seed=1):
    rng = np.random.default_rng(seed)
    lo, hi = raw["xmin"], raw["xmax"]
    inside = lo + rng.uniform(0.05, 0.95, (8, len(lo))) * (hi - lo)
    return np.vstack([raw["train"][rng.choice(len(raw["train"]), n_train, replace=False)],
                      0.5 * (lo + hi), lo, hi, inside])


def test_bossbrain_matches_independent_numpy(bossbrain_dir, raw_bossbrain):
    raw = raw_bossbrain
    model = load(bossbrain_dir)
    assert isinstance(model, PayneMLP) and model.activation == "leaky_relu"
    assert model.negative_slope == pytest.approx(raw["slope"]) == pytest.approx(0.01)
    assert list(model.label_names) == raw["names"] and len(raw["names"]) == 22
    np.testing.assert_array_equal(model.label_bounds, np.stack([raw["xmin"], raw["xmax"]], 1))
    labels = _label_sets(raw)
    ref = _payne_forward(labels, raw["w"], raw["b"], raw["xmin"], raw["xmax"], raw["slope"])
    _assert_rel(model.predict(labels), ref)
    # The scaling is x = (label - x_min)/(x_max - x_min) - 0.5: box corners map to -0.5 / +0.5.
    corners = torch.as_tensor(np.stack([raw["xmin"], raw["xmax"]]))
    np.testing.assert_allclose(model.scale(corners).numpy(), [[-0.5] * 22, [0.5] * 22], atol=1e-12)


def test_bossbrain_metadata(bossbrain_dir, raw_bossbrain):
    meta = json.loads((bossbrain_dir / "model.json").read_text())
    assert meta["kind"] == "payne-mlp" and meta["wavelength_medium"] == "air" and meta["resolution"] is None
    assert meta["architecture"]["layer_sizes"] == [22, 300, 300, 14001]
    src = meta["source"]
    assert src["package"] == "bossbrain" and src["file"] == "ann_22pars_4000-5000.pkl"
    assert src["version"] == importlib.metadata.version("bossbrain") and len(src["sha256"]) == 64
    model = load(bossbrain_dir)
    assert model.meta["name"] and model.meta["source"] == src
    np.testing.assert_array_equal(model.wavelength, 3500.0 + 0.5 * np.arange(14001))
    np.testing.assert_array_equal(model.training_labels, raw_bossbrain["train"])


def test_bossbrain_round_trip(bossbrain_dir, raw_bossbrain, tmp_path):
    a = load(bossbrain_dir)
    b = load(a.save(tmp_path / "again"))
    labels = _label_sets(raw_bossbrain, n_train=16, seed=2)
    np.testing.assert_array_equal(a.predict(labels), b.predict(labels))
    assert b.meta["weights_sha256"] == a.meta["weights_sha256"]


# torch's own jvp decompositions call the deprecated torch.jit.script on first use of jacfwd.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_bossbrain_jacobian(bossbrain_dir, raw_bossbrain):
    model = load(bossbrain_dir).double()
    rng = np.random.default_rng(3)
    labels = np.vstack([raw_bossbrain["train"][:2], 0.5 * (raw_bossbrain["xmin"] + raw_bossbrain["xmax"])])
    x = model.scale(torch.as_tensor(labels)) + torch.as_tensor(rng.normal(0, 1e-3, labels.shape))
    y, jac = model.value_and_jacobian(x)
    assert y.shape == (3, 14001) and jac.shape == (3, 14001, 22) and jac.dtype == torch.float64
    torch.testing.assert_close(y, model(x), rtol=0, atol=1e-12)
    eps, eye = 1e-6, torch.eye(22, dtype=torch.float64)
    fd = torch.stack([(model(x + eps * eye[j]) - model(x - eps * eye[j])) / (2 * eps) for j in range(22)], -1)
    assert (fd - jac).abs().max() < 1e-6 * jac.abs().max()
    y_ad, jac_ad = Emulator.value_and_jacobian(model, x)  # the generic autograd version
    torch.testing.assert_close(jac_ad, jac, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y_ad, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("teff_range", ["3500-4200", "4900-6000"])
def test_bossbrain_other_ranges(tmp_path, teff_range):
    pytest.importorskip("bossbrain")
    from distlabels.models.importers import bossbrain_pickle_path

    em = safe_load(bossbrain_pickle_path(teff_range)).state
    seq = em["model"].state["_modules"]["features"].state["_modules"]
    model = load(import_bossbrain(teff_range, tmp_path / "m"))
    labels = em["training_labels"][::997]
    ref = _payne_forward(labels, [seq[k].state["_parameters"]["weight"].numpy() for k in "024"],
                         [seq[k].state["_parameters"]["bias"].numpy() for k in "024"], em["xmin"], em["xmax"])
    _assert_rel(model.predict(labels), ref)
    assert model.meta["source"]["file"] == f"ann_22pars_{teff_range}.pkl"


def test_bossbrain_bad_range_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(DistlabelsError, match="4000-5000"):
        import_bossbrain("5000-7000", tmp_path / "m")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bossbrain" else real(name, *a))
    with pytest.raises(DistlabelsError, match="pip install bossbrain"):
        import_bossbrain("4000-5000", tmp_path / "m")


# ----- The Payne's npz ---------------------------------------------------------------------------
def _payne_arrays(seed=0, sizes=(4, 16, 12, 50)):
    rng = np.random.default_rng(seed)
    arr = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        arr[f"w_array_{k}"] = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
        arr[f"b_array_{k}"] = rng.normal(0, 0.1, n_out).astype(np.float32)
    arr["x_min"] = np.array([4000.0, 1.0, -2.0, -0.2])[: sizes[0]]
    arr["x_max"] = np.array([7000.0, 5.0, 0.5, 0.6])[: sizes[0]]
    return arr


def test_payne_npz_matches_numpy(tmp_path):
    arr = _payne_arrays()
    npz = tmp_path / "payne.npz"
    np.savez(npz, **arr)
    wave = 15000.0 + 0.2 * np.arange(50)
    model = load(import_payne_npz(npz, tmp_path / "m", wavelength=wave))
    assert model.label_names == ("label_0", "label_1", "label_2", "label_3")
    assert model.wavelength_medium == "vacuum" and model.negative_slope == 0.01
    rng = np.random.default_rng(5)
    labels = arr["x_min"] + rng.uniform(0, 1, (20, 4)) * (arr["x_max"] - arr["x_min"])
    ref = _payne_forward(labels, [arr[f"w_array_{k}"] for k in range(3)], [arr[f"b_array_{k}"] for k in range(3)],
                         arr["x_min"], arr["x_max"])
    _assert_rel(model.predict(labels), ref)
    np.testing.assert_array_equal(model.wavelength, wave)
    assert model.meta["source"]["format"] == "payne-npz" and model.meta["name"] == "payne"


@pytest.mark.parametrize("kind", ["npy", "txt", "npz"])
def test_payne_npz_wavelength_files_and_names(tmp_path, kind):
    arr = _payne_arrays(sizes=(3, 8, 8, 20))
    npz = tmp_path / "payne.npz"
    np.savez(npz, **arr)
    wave = np.linspace(4000.0, 5000.0, 20)
    wfile = tmp_path / f"wave.{kind}"
    {"npy": lambda: np.save(wfile, wave), "txt": lambda: np.savetxt(wfile, wave),
     "npz": lambda: np.savez(wfile, wavelength=wave)}[kind]()
    model = load(import_payne_npz(npz, tmp_path / "m", wavelength=wfile, wavelength_medium="air",
                                  label_names=["teff", "logg", "feh"], resolution=22500))
    np.testing.assert_allclose(model.wavelength, wave, rtol=1e-15)
    assert model.label_names == ("teff", "logg", "feh") and model.resolution == 22500
    assert model.wavelength_medium == "air"


def _expect_format_error(tmp_path, arr, match, **kw):
    npz = tmp_path / "bad.npz"
    np.savez(npz, **arr)
    with pytest.raises(ModelFormatError, match=match) as ei:
        import_payne_npz(npz, tmp_path / "m", **({"wavelength": np.arange(1.0, 51.0)} | kw))
    assert "\n" not in str(ei.value)


def test_payne_npz_malformed(tmp_path):
    arr = _payne_arrays()
    _expect_format_error(tmp_path, {k: v for k, v in arr.items() if k != "x_max"}, "lacks x_max")
    _expect_format_error(tmp_path, {k: v for k, v in arr.items() if k != "b_array_1"}, "no b_array_1")
    _expect_format_error(tmp_path, arr | {"w_array_1": arr["w_array_1"][:, :-1]}, "w_array_1 takes 15 inputs")
    _expect_format_error(tmp_path, arr | {"w_array_1": arr["w_array_1"].T}, "not an .out, in. float matrix")
    _expect_format_error(tmp_path, arr | {"b_array_2": arr["b_array_2"][:-1]}, "b_array_2")
    _expect_format_error(tmp_path, arr | {"x_min": arr["x_min"][:3]}, "x_min")
    _expect_format_error(tmp_path, arr | {"x_max": arr["x_min"]}, "x_max <= x_min")
    _expect_format_error(tmp_path, arr, "49 values", wavelength=np.arange(1.0, 50.0))
    _expect_format_error(tmp_path, arr, "increasing", wavelength=np.arange(50.0, 0.0, -1.0))
    _expect_format_error(tmp_path, arr, "no wavelength grid", wavelength=None)
    _expect_format_error(tmp_path, arr, "label names", label_names=["a"])
    _expect_format_error(tmp_path, arr | {"x_min": np.array([{"a": 1}] * 4, dtype=object)}, "not a readable")
    text = tmp_path / "notes.npz"
    text.write_text("not an npz")
    with pytest.raises(ModelFormatError, match="not a readable"):
        import_payne_npz(text, tmp_path / "m", wavelength=np.arange(1.0, 51.0))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ModelFormatError, match="single"):
        import_payne_npz(tmp_path / "single.npy", tmp_path / "m", wavelength=np.arange(1.0, 51.0))
    with pytest.raises(ModelFormatError, match="does not exist"):
        import_payne_npz(tmp_path / "missing.npz", tmp_path / "m")
