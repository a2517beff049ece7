"""Convert published emulators into distlabels model directories (``model.json`` + safetensors).

* :func:`import_bossbrain`: the BOSS networks shipped in the ``bossbrain`` package (dill pickles of
  theborg emulators, read with :mod:`.safe_pickle`, never with dill/theborg);
* :func:`import_payne_npz`: The Payne's saved network (``w_array_k`` / ``b_array_k`` / ``x_min`` /
  ``x_max``), read with ``allow_pickle=False``.

Both produce a :class:`~distlabels.models.PayneMLP` and save it; the result loads with
:func:`distlabels.models.load`.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DistlabelsError, ModelFormatError
from .base import sha256_file
from .payne import PayneMLP
from .payne_perpixel import PerPixelPayne
from .safe_pickle import PickledRecord, safe_load

__all__ = ["APOGEE_RESOLUTION", "BOSSBRAIN_TEFF_RANGES", "bossbrain_pickle_path", "bossbrain_wavelength", "import_bossbrain",
           "import_payne_npz", "read_bossbrain_network"]

BOSSBRAIN_TEFF_RANGES = ("3500-4200", "4000-5000", "4900-6000")
APOGEE_PAYNE_LABELS = ("teff", "logg", "feh", "alphafe", "vmacro")
_APOGEE_N_PIX = 7214
APOGEE_RESOLUTION = 22500.0     # APOGEE's resolving power, the resolution of the published network's spectra


def bossbrain_wavelength(n_pix: int = 14001) -> np.ndarray:
    """(n_pix,) bossbrain's model grid in AIR Angstrom: 3500 + 0.5 i (synspec; not in the pickle)."""
    return 3500.0 + 0.5 * np.arange(n_pix, dtype=np.float64)


def bossbrain_pickle_path(teff_range: str = "4000-5000") -> Path:
    """Path of ``ann_22pars_<teff_range>.pkl`` inside the installed bossbrain package.

    Located with ``importlib.util.find_spec`` so that no bossbrain code runs.
    """
    if teff_range not in BOSSBRAIN_TEFF_RANGES:
        raise DistlabelsError(f"bossbrain has no network for Teff range {teff_range!r} "
                              f"(choose one of {', '.join(BOSSBRAIN_TEFF_RANGES)}).")
    spec = importlib.util.find_spec("bossbrain")
    if spec is None or not spec.submodule_search_locations:
        raise DistlabelsError("the bossbrain package is not installed; run `pip install bossbrain` "
                              "(or `pip install distlabels[data]`).")
    for root in spec.submodule_search_locations:
        p = Path(root) / "data" / f"ann_22pars_{teff_range}.pkl"
        if p.is_file():
            return p
    raise DistlabelsError(f"the installed bossbrain package has no data/ann_22pars_{teff_range}.pkl; "
                          f"reinstall it with `pip install --force-reinstall bossbrain`.")


def _state(obj: Any, cls_names: str | tuple[str, ...], where: str) -> dict:
    """The state dict of a :class:`PickledRecord` of one of ``cls_names``."""
    names = (cls_names,) if isinstance(cls_names, str) else cls_names
    if not isinstance(obj, PickledRecord) or obj.name not in names or not isinstance(getattr(obj, "state", None), dict):
        raise ModelFormatError(f"{where}: expected a pickled {' or '.join(names)} but found {obj!r}.")
    return obj.state


def _array(t: Any, what: str, where: str) -> np.ndarray:
    import torch

    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
        raise ModelFormatError(f"{where}: {what} is not a 1-d or 2-d tensor.")
    return t.detach().cpu().numpy().astype(np.float32)


def read_bossbrain_network(path: str | os.PathLike) -> dict[str, Any]:
    """Weights and label scaling of a bossbrain/theborg emulator pickle, as plain arrays.

    Returns a dict: ``weights`` list of (out, in) float32 arrays, ``biases`` list of (out,),
    ``activation`` ("leaky_relu"), ``negative_slope``, ``x_min`` / ``x_max`` (n_labels,) physical
    units, ``label_names`` list, ``training_labels`` (n_train, n_labels).
    """
    src = str(path)
    em = _state(safe_load(path), "Emulator", src)
    try:
        model = _state(em["model"], "MultiEmulatorModel", src)
        seq = _state(model["_modules"]["features"], "Sequential", src)["_modules"]
        layers = [seq[k] for k in sorted(seq, key=int)]
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"{src} holds no theborg model with a 'features' Sequential.") from None
    weights, biases, slopes = [], [], set()
    for i, layer in enumerate(layers):
        want_linear = i % 2 == 0
        if want_linear:
            params = _state(layer, "Linear", src).get("_parameters") or {}
            if "weight" not in params or params.get("bias") is None:
                raise ModelFormatError(f"{src}: Linear layer {i} lacks a weight or bias.")
            weights.append(_array(params["weight"], f"layer {i} weight", src))
            biases.append(_array(params["bias"], f"layer {i} bias", src))
        else:
            slopes.add(float(_state(layer, "LeakyReLU", src).get("negative_slope", 0.01)))
    if len(layers) % 2 == 0 or len(slopes) > 1:
        raise ModelFormatError(f"{src}: the network is not Linear/LeakyReLU/.../Linear with one slope.")
    try:
        out = dict(weights=weights, biases=biases, activation="leaky_relu",
                   negative_slope=slopes.pop() if slopes else 0.01,
                   x_min=np.asarray(em["xmin"], np.float64), x_max=np.asarray(em["xmax"], np.float64),
                   label_names=[str(n) for n in em["label_names"]],
                   training_labels=None if em.get("training_labels") is None
                   else np.asarray(em["training_labels"], np.float64))
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"{src} lacks xmin, xmax or label_names.") from None
    return out


def import_bossbrain(teff_range: str = "4000-5000", out: str | os.PathLike | None = None) -> Path:
    """Convert bossbrain's ``ann_22pars_<teff_range>`` network into a model directory ``out``.

    22 labels (teff K, logg, [M/H], [X/M]...), 14001 pixels on 3500 + 0.5 i AIR Angstrom,
    LeakyReLU MLP 22 -> 300 -> 300 -> 14001. Returns ``out`` as a Path.
    """
    if out is None:
        raise DistlabelsError("import_bossbrain needs an output directory (out=...).")
    src = bossbrain_pickle_path(teff_range)
    net = read_bossbrain_network(src)
    try:
        version = importlib.metadata.version("bossbrain")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        version = None
    n_pix = len(net["biases"][-1])
    model = PayneMLP(
        net["weights"], net["biases"], activation=net["activation"], negative_slope=net["negative_slope"],
        label_names=net["label_names"], x_min=net["x_min"], x_max=net["x_max"],
        wavelength_aa=bossbrain_wavelength(n_pix), wavelength_medium="air", resolution=None,
        training_labels=net["training_labels"], model_variance=None,
        meta={"source": {"package": "bossbrain", "version": version, "file": src.name,
                         "sha256": sha256_file(src)},
              "name": f"bossbrain-{src.stem}",
              "notes": "wavelength grid 3500 + 0.5 i Angstrom (air, synspec) from bossbrain.ann; "
                       "not stored in the pickle"})
    return model.save(out)


# ----- The Payne's npz -------------------------------------------------------------------------
def _read_wavelength(wavelength: Any, n_pix: int) -> np.ndarray:
    """(n_pix,) Angstrom from an array or a .npz / .npy / text file; strictly increasing."""
    if isinstance(wavelength, (str, os.PathLike)):
        p = Path(wavelength)
        if not p.is_file():
            raise ModelFormatError(f"wavelength file {p} does not exist.")
        try:
            if p.suffix in (".npz", ".npy"):
                z = np.load(p, allow_pickle=False)
                if isinstance(z, np.lib.npyio.NpzFile):
                    with z:
                        keys = [k for k in ("wavelength", "wave", "wavelength_aa", "lambda") if k in z.files]
                        if not keys and len(z.files) != 1:
                            raise ModelFormatError(f"{p} has no 'wavelength' array (keys: {', '.join(z.files)}).")
                        z = z[keys[0] if keys else z.files[0]]
                w = z
            else:
                w = np.loadtxt(p, dtype=np.float64)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise ModelFormatError(f"wavelength file {p} is not readable ({e.__class__.__name__}: {e}).") from None
        where = str(p)
    else:
        w, where = wavelength, "the wavelength array"
    try:
        w = np.asarray(w, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ModelFormatError(f"{where} is not numeric.") from None
    if w.shape != (n_pix,):
        raise ModelFormatError(f"{where} has {w.size} values but the network has {n_pix} output pixels.")
    if not (np.all(np.isfinite(w)) and np.all(w > 0) and np.all(np.diff(w) > 0)):
        raise ModelFormatError(f"{where} is not a finite, positive, strictly increasing grid in Angstrom.")
    return w


def _default_label_names(n_labels: int, n_pix: int) -> list[str]:
    if n_labels == len(APOGEE_PAYNE_LABELS) and n_pix == _APOGEE_N_PIX:
        return list(APOGEE_PAYNE_LABELS)  # the published APOGEE network (Ting et al. 2019)
    return [f"label_{i}" for i in range(n_labels)]


def _npz_scaling_names_wave(arrays, p, n_labels: int, n_pix: int, label_names, wavelength):
    """Label scaling (x_min, x_max), label names and wavelength grid (Angstrom) of a Payne .npz, checked
    against the network's n_labels inputs and n_pix outputs (both layouts share this)."""
    x_min = np.asarray(arrays["x_min"], np.float64).reshape(-1)
    x_max = np.asarray(arrays["x_max"], np.float64).reshape(-1)
    if x_min.shape != (n_labels,) or x_max.shape != (n_labels,):
        raise ModelFormatError(f"{p}: x_min/x_max have {x_min.size}/{x_max.size} values but the network "
                               f"takes {n_labels} labels.")
    if label_names is None:
        if "label_names" in arrays and arrays["label_names"].dtype.kind == "U":
            label_names = [str(s) for s in arrays["label_names"].reshape(-1)]
        else:
            label_names = _default_label_names(n_labels, n_pix)
    label_names = [str(s) for s in label_names]
    if len(label_names) != n_labels:
        raise ModelFormatError(f"{len(label_names)} label names were given but the network takes {n_labels} labels.")
    if wavelength is None:
        if "wavelength" not in arrays:
            raise ModelFormatError(f"{p} holds no wavelength grid; pass wavelength= (an array or a file of "
                                   f"{n_pix} Angstrom values).")
        wavelength = arrays["wavelength"]
    return x_min, x_max, label_names, _read_wavelength(wavelength, n_pix)


def import_payne_npz(npz_path: str | os.PathLike, out: str | os.PathLike, *, wavelength: Any = None,
                     wavelength_medium: str = "vacuum", label_names: Sequence[str] | None = None,
                     resolution: float | None = None, continuum_pixels: Any = None, bad_pixels: Any = None) -> Path:
    """Convert The Payne's saved network (``.npz``) into a model directory ``out``.

    Keys: ``w_array_k`` (out, in) torch layout and ``b_array_k`` (out,) for k = 0..K, ``x_min`` /
    ``x_max`` (n_labels,); LeakyReLU(0.01) between layers. ``wavelength`` (Angstrom, in
    ``wavelength_medium``): an array or a .npz / .npy / text file; when None the npz must hold a
    ``wavelength`` array. ``label_names`` default: an npz ``label_names`` array, else
    teff/logg/feh/alphafe/vmacro for the 5-label 7214-pixel APOGEE network, else label_0...

    The 2018-19 per-pixel layout is recognised from the shapes (``w_array_0`` (n_pix, n_hidden,
    n_labels), ``b_array_0`` (n_pix, n_hidden), ``w_array_1`` (n_pix, n_hidden), ``b_array_1``
    (n_pix,); sigmoid) and becomes a ``payne-perpixel`` model (:mod:`.payne_perpixel`).
    ``continuum_pixels`` / ``bad_pixels`` (per-pixel only): bool arrays or one-array .npz/.npy files
    over the network's pixels: its pseudo-continuum pixels and the pixels to leave out of fits.
    """
    p = Path(npz_path)
    if not p.is_file():
        raise ModelFormatError(f"Payne network file {p} does not exist.")
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ModelFormatError(f"{p} is a single .npy array, not The Payne's .npz network.")
        with z:  # object arrays raise ValueError here, since allow_pickle=False
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ModelFormatError(f"{p} is not a readable .npz file ({e.__class__.__name__}: {e}).") from None
    missing = [k for k in ("w_array_0", "b_array_0", "x_min", "x_max") if k not in arrays]
    if missing:
        raise ModelFormatError(f"{p} is not a Payne network: it lacks {', '.join(missing)}.")
    if arrays["w_array_0"].ndim == 3:
        return _import_per_pixel(p, arrays, out, wavelength=wavelength, wavelength_medium=wavelength_medium,
                                 label_names=label_names, resolution=resolution,
                                 continuum_pixels=continuum_pixels, bad_pixels=bad_pixels)
    n_layers = 0
    while f"w_array_{n_layers}" in arrays:
        n_layers += 1
    weights, biases = [], []
    for k in range(n_layers):
        if f"b_array_{k}" not in arrays:
            raise ModelFormatError(f"{p} has w_array_{k} but no b_array_{k}.")
        w, b = arrays[f"w_array_{k}"], arrays[f"b_array_{k}"]
        if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[0] or not np.issubdtype(w.dtype, np.floating):
            raise ModelFormatError(f"{p}: w_array_{k} {w.shape} and b_array_{k} {b.shape} are not an (out, in) "
                                   f"float matrix and its (out,) bias.")
        n_in = weights[-1].shape[0] if weights else (w.shape[1] if w.ndim == 2 else 0)
        if w.shape[1] != n_in:
            raise ModelFormatError(f"{p}: w_array_{k} takes {w.shape[1]} inputs but layer {k - 1} gives {n_in}.")
        weights.append(w.astype(np.float32))
        biases.append(b.astype(np.float32))
    n_labels, n_pix = weights[0].shape[1], weights[-1].shape[0]
    x_min, x_max, label_names, wave = _npz_scaling_names_wave(arrays, p, n_labels, n_pix, label_names, wavelength)
    model = PayneMLP(weights, biases, activation="leaky_relu", negative_slope=0.01,
                     label_names=label_names, x_min=x_min, x_max=x_max, wavelength_aa=wave,
                     wavelength_medium=wavelength_medium, resolution=resolution, training_labels=None,
                     meta={"source": {"format": "payne-npz", "file": p.name, "sha256": sha256_file(p)},
                           "name": p.stem})
    return model.save(out)


def _read_pixel_mask(src: Any, n_pix: int, what: str) -> np.ndarray | None:
    """(n_pix,) bool from an array or a .npz (one array, or the one named like a mask) / .npy file."""
    if src is None:
        return None
    where = what
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        where = f"{what} file {p}"
        if not p.is_file():
            raise ModelFormatError(f"{where} does not exist.")
        try:
            z = np.load(p, allow_pickle=False)
            if isinstance(z, np.lib.npyio.NpzFile):
                with z:
                    if len(z.files) != 1:
                        raise ModelFormatError(f"{where} holds {len(z.files)} arrays ({', '.join(z.files)}); "
                                               f"expected one {n_pix}-pixel mask.")
                    z = z[z.files[0]]
            src = z
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ModelFormatError(f"{where} is not a readable .npz/.npy file ({e.__class__.__name__}).") from None
    m = np.asarray(src).reshape(-1)
    if m.shape != (n_pix,) or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
        raise ModelFormatError(f"{where} is not a boolean array of the network's {n_pix} pixels.")
    return m.astype(bool)


def _import_per_pixel(p: Path, arrays: dict, out, *, wavelength, wavelength_medium, label_names, resolution,
                      continuum_pixels, bad_pixels) -> Path:
    """The 2018-19 per-pixel layout (see :func:`import_payne_npz`) -> a ``payne-perpixel`` model directory."""
    w0 = arrays["w_array_0"]
    n_pix, n_hidden, n_labels = w0.shape
    want = {"b_array_0": (n_pix, n_hidden), "w_array_1": (n_pix, n_hidden), "b_array_1": (n_pix,)}
    for k, shape in want.items():
        if k not in arrays:
            raise ModelFormatError(f"{p} has a per-pixel w_array_0 {w0.shape} but no {k}.")
        if arrays[k].shape != shape or not np.issubdtype(arrays[k].dtype, np.floating):
            raise ModelFormatError(f"{p}: {k} is {arrays[k].shape} but the per-pixel layout needs a float {shape}.")
    if "w_array_2" in arrays:
        raise ModelFormatError(f"{p} mixes the per-pixel layout (3-d w_array_0) with a third layer (w_array_2).")
    x_min, x_max, label_names, wave = _npz_scaling_names_wave(arrays, p, n_labels, n_pix, label_names, wavelength)
    apogee = n_pix == _APOGEE_N_PIX and 15000 < wave[0] < wave[-1] < 17100
    notes = ["output: continuum-normalised flux (pseudo-continuum: a polynomial per chip fitted to the "
             "continuum pixels), so a fit needs no full continuum, only a low-order correction"]
    if resolution is None and apogee:
        resolution = APOGEE_RESOLUTION    # the network's spectra are at APOGEE's resolution: no LSF on top
        notes.append(f"resolution R = {APOGEE_RESOLUTION:.0f} assumed (APOGEE); spectra at that R get no extra LSF")
    if "vmacro" in label_names:
        notes.append("vmacro is a label: no extra broadening should be applied on top")
    model = PerPixelPayne(
        w0.astype(np.float32), arrays["b_array_0"].astype(np.float32), arrays["w_array_1"].astype(np.float32),
        arrays["b_array_1"].astype(np.float32),
        continuum_pixels=_read_pixel_mask(continuum_pixels, n_pix, "continuum_pixels"),
        bad_pixels=_read_pixel_mask(bad_pixels, n_pix, "bad_pixels"),
        label_names=label_names, x_min=x_min, x_max=x_max, wavelength_aa=wave, wavelength_medium=wavelength_medium,
        resolution=resolution, training_labels=None,
        meta={"source": {"format": "payne-npz-perpixel", "file": p.name, "sha256": sha256_file(p)},
              "name": p.stem, "notes": "; ".join(notes),
              "flux_normalization": {"output": "pseudo-continuum-normalised",
                                     "continuum_pixels_stored": continuum_pixels is not None,
                                     "fit_continuum": "low-order correction only (see distlabels.fit.payne_perpixel)"}})
    return model.save(out)
