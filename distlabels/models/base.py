"""The one interface every emulator kind implements, and the registry of kinds.

An emulator maps physical labels (n_star, n_labels) to continuum-normalised flux on its own
wavelength grid (n_star, n_pix). Internally it works on *scaled* labels
``x = (labels - x_min) / (x_max - x_min) - 0.5`` so that the training box is [-0.5, 0.5]^n; the fit
kernel works in that space too, which keeps the Levenberg-Marquardt problem well conditioned.

A model directory holds ``model.json`` (kind, label names and bounds, wavelength grid and medium,
resolution, scaling, provenance) and ``weights.safetensors`` (every tensor, including
``training_labels`` and ``model_variance``). Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .. import paths
from ..errors import ModelFormatError

_KINDS: dict[str, type["Emulator"]] = {}


def register_kind(name: str):
    """Class decorator: make an :class:`Emulator` subclass loadable from ``model.json`` kind ``name``."""

    def deco(cls):
        if name in _KINDS and _KINDS[name] is not cls:
            raise ValueError(f"emulator kind {name!r} is already registered")
        cls.kind = name
        _KINDS[name] = cls
        return cls

    return deco


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Emulator(torch.nn.Module):
    """Base class: labels -> normalised flux on ``wavelength`` (Angstrom, ``wavelength_medium``).

    Subclasses implement :meth:`forward` on scaled labels and may override
    :meth:`value_and_jacobian` (analytic) and :meth:`project` (fold a linear resampling into the
    model, e.g. into an MLP's last layer).
    """

    kind: ClassVar[str] = "abstract"

    def __init__(self, *, label_names, x_min, x_max, wavelength_aa, wavelength_medium: str,
                 resolution: float | None = None, training_labels=None, model_variance=None,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if wavelength_medium not in ("air", "vacuum"):
            raise ModelFormatError(f"wavelength_medium must be 'air' or 'vacuum', not {wavelength_medium!r}.")
        self.label_names: tuple[str, ...] = tuple(label_names)
        x_min = torch.as_tensor(np.asarray(x_min, dtype=np.float64))
        x_max = torch.as_tensor(np.asarray(x_max, dtype=np.float64))
        if x_min.shape != (len(self.label_names),) or x_max.shape != x_min.shape:
            raise ModelFormatError("label scaling x_min/x_max does not match the number of labels.")
        if not torch.all(x_max > x_min):
            raise ModelFormatError("label scaling has x_max <= x_min for some label.")
        self.register_buffer("x_min", x_min, persistent=False)
        self.register_buffer("x_max", x_max, persistent=False)
        self.wavelength = np.asarray(wavelength_aa, dtype=np.float64)  # (n_pix,) Angstrom
        self.wavelength_medium = wavelength_medium
        self.resolution = None if resolution is None else float(resolution)
        tl = np.zeros((0, len(self.label_names))) if training_labels is None else np.asarray(training_labels, np.float64)
        if tl.ndim != 2 or tl.shape[1] != len(self.label_names):
            raise ModelFormatError(f"training_labels must be (n, {len(self.label_names)}); got {tl.shape}.")
        self.training_labels = tl  # (n_train, n_labels) physical units
        mv = np.zeros(len(self.wavelength)) if model_variance is None else np.asarray(model_variance, np.float64)
        if mv.shape != self.wavelength.shape:
            raise ModelFormatError("model_variance must have one value per model pixel.")
        self.register_buffer("model_variance", torch.as_tensor(mv, dtype=torch.float32), persistent=False)
        self.meta: dict[str, Any] = dict(meta or {})

    # ----- label space ---------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pix(self) -> int:
        return len(self.wavelength)

    @property
    def label_bounds(self) -> np.ndarray:
        """(n_labels, 2) physical lower and upper bound of each label (the training box)."""
        return np.stack([self.x_min.cpu().numpy(), self.x_max.cpu().numpy()], axis=1)

    def scale(self, labels: torch.Tensor) -> torch.Tensor:
        """Physical labels (..., n_labels) -> scaled labels in [-0.5, 0.5] inside the box."""
        lo, hi = self.x_min.to(labels), self.x_max.to(labels)
        return (labels - lo) / (hi - lo) - 0.5

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.x_min.to(x), self.x_max.to(x)
        return (x + 0.5) * (hi - lo) + lo

    @property
    def label_span(self) -> np.ndarray:
        """(n_labels,) x_max - x_min: multiply scaled errors by this to get physical errors."""
        return (self.x_max - self.x_min).cpu().numpy()

    # ----- evaluation ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Scaled labels (n, n_labels) -> flux (n, n_pix)."""
        raise NotImplementedError

    def value_and_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux (n, n_pix) and its Jacobian with respect to scaled labels (n, n_pix, n_labels).

        Generic version through autograd (forward-mode, vectorised over stars); kinds with a
        closed form override it.
        """
        from torch.func import jacfwd, vmap

        def one(xi):
            y = self.forward(xi[None])[0]
            return y, y

        jac, y = vmap(jacfwd(one, has_aux=True))(x)
        return y, jac

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        return self.value_and_jacobian(x)[1]

    def value_and_jacobian_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Flux and Jacobian in one tensor, pixels last: (n, 1 + n_labels, n_pix).

        Row 0 is the flux, row 1 + j its derivative with respect to scaled label j. This layout
        (each star's rows contiguous along pixels) is what the fit kernel gathers and broadens;
        kinds with a closed form produce it directly (one matrix product for an MLP).
        """
        y, jac = self.value_and_jacobian(x)
        return torch.cat([y[:, None, :], jac.transpose(1, 2)], 1)

    def with_inputs(self, matrix, offset) -> "Emulator":
        """A model of parameters theta (n, k) with labels x = offset + theta @ matrix.T.

        matrix: (n_labels, k), offset: (n_labels,), scaled units. The fit kernel uses it to fit a
        subset of labels, fixed values and ties; MLP kinds fold it into their first layer so that
        the Jacobian has k columns. The returned model's scaling is the identity on theta.
        """
        return InputMappedEmulator(self, matrix, offset)

    @torch.no_grad()
    def predict(self, labels, wavelength_aa=None) -> np.ndarray:
        """Physical labels (n, n_labels) -> flux (n, n_pix) as numpy.

        ``wavelength_aa`` (in the model's medium) evaluates on another grid; grid-bound kinds
        interpolate linearly, kinds that take wavelength as an input override this.
        """
        p = next(iter(self.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None else torch.float32
        lab = torch.as_tensor(np.atleast_2d(np.asarray(labels, np.float64)), dtype=torch.float64, device=dev)
        flux = self.forward(self.scale(lab).to(dtype)).double().cpu().numpy()
        if wavelength_aa is None:
            return flux
        w = np.asarray(wavelength_aa, np.float64)
        return np.stack([np.interp(w, self.wavelength, f, left=np.nan, right=np.nan) for f in flux])

    def project(self, matrix) -> "Emulator":
        """A model whose output is ``matrix @ flux``: matrix (n_out, n_pix), dense or sparse.

        Used by the fit kernel to evaluate the emulator directly on a working grid (resampled and
        convolved with the instrument's line-spread function). The default wraps the model.
        """
        return ProjectedEmulator(self, matrix)

    # ----- persistence ---------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Kind-specific tensors to store (weights); the base adds the shared ones."""
        raise NotImplementedError

    def kind_meta(self) -> dict[str, Any]:
        """Kind-specific JSON metadata (architecture)."""
        return {}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], common: dict[str, Any]):
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.json`` + ``weights.safetensors`` into ``directory`` (created)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        tensors["training_labels"] = torch.as_tensor(self.training_labels, dtype=torch.float64)
        tensors["model_variance"] = self.model_variance.detach().cpu().double()
        tensors["wavelength_aa"] = torch.as_tensor(self.wavelength, dtype=torch.float64)
        wpath = out / paths.MODEL_WEIGHTS
        tmp = paths.temp_path(wpath)
        save_file(tensors, str(tmp))
        os.replace(tmp, wpath)
        core_keys = {"format", "kind", "label_names", "label_bounds", "scaling", "wavelength_medium", "wavelength_aa",
                     "n_pix", "resolution", "n_training_labels", "architecture", "weights_sha256", "path"}
        meta = {
            **{k: v for k, v in self.meta.items() if k not in core_keys},
            "format": "distlabels-model/1",
            "kind": self.kind,
            "label_names": list(self.label_names),
            "label_bounds": self.label_bounds.tolist(),
            "scaling": {"type": "minmax_centered",
                        "formula": "x = (label - x_min) / (x_max - x_min) - 0.5",
                        "x_min": self.x_min.tolist(), "x_max": self.x_max.tolist()},
            "wavelength_medium": self.wavelength_medium,
            "wavelength_aa": self.wavelength.tolist(),
            "n_pix": self.n_pix,
            "resolution": self.resolution,
            "n_training_labels": int(len(self.training_labels)),
            "architecture": self.kind_meta(),
            "weights_sha256": sha256_file(wpath),
        }
        mpath = out / paths.MODEL_META
        tmp = paths.temp_path(mpath)
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, mpath)
        return out

    @property
    def model_id(self) -> str:
        """Short stable identifier: kind + first 12 hex digits of the weights' sha256."""
        return f"{self.kind}-{self.meta.get('weights_sha256', 'unsaved')[:12]}"


class ProjectedEmulator(Emulator):
    """``matrix @ base(x)``: the generic fallback of :meth:`Emulator.project`."""

    kind = "projected"

    def __init__(self, base: Emulator, matrix):
        m = matrix if isinstance(matrix, torch.Tensor) else torch.as_tensor(np.asarray(matrix))
        n_out = m.shape[0]
        super().__init__(label_names=base.label_names, x_min=base.x_min.cpu().numpy(),
                         x_max=base.x_max.cpu().numpy(), wavelength_aa=np.arange(n_out, dtype=float),
                         wavelength_medium=base.wavelength_medium, resolution=base.resolution,
                         training_labels=base.training_labels, meta=base.meta)
        self.base = base
        self.register_buffer("matrix", m.to(torch.float32), persistent=False)

    def _apply_matrix(self, y):  # y (n, n_pix) or (n, n_pix, L)
        m = self.matrix.to(y.dtype)
        if y.dim() == 2:
            return (m @ y.T).T
        n, p, L = y.shape
        return (m @ y.permute(1, 0, 2).reshape(p, n * L)).reshape(-1, n, L).permute(1, 0, 2)

    def forward(self, x):
        return self._apply_matrix(self.base(x))

    def value_and_jacobian(self, x):
        y, j = self.base.value_and_jacobian(x)
        return self._apply_matrix(y), self._apply_matrix(j)


class InputMappedEmulator(Emulator):
    """``base(offset + theta @ matrix.T)``: the generic fallback of :meth:`Emulator.with_inputs`."""

    kind = "input-mapped"

    def __init__(self, base: Emulator, matrix, offset):
        m = torch.as_tensor(np.asarray(matrix, np.float64))
        k = m.shape[1]
        super().__init__(label_names=[f"theta{i}" for i in range(k)], x_min=np.full(k, -0.5), x_max=np.full(k, 0.5),
                         wavelength_aa=base.wavelength, wavelength_medium=base.wavelength_medium,
                         resolution=base.resolution, meta=base.meta)
        self.base = base
        self.register_buffer("matrix", m, persistent=False)
        self.register_buffer("offset", torch.as_tensor(np.asarray(offset, np.float64)), persistent=False)

    def _x(self, theta):
        return (self.offset.to(theta) + theta @ self.matrix.to(theta).T)

    def forward(self, theta):
        return self.base(self._x(theta))

    def value_and_jacobian(self, theta):
        y, j = self.base.value_and_jacobian(self._x(theta))
        return y, j @ self.matrix.to(j)


def read_model_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a model directory, with one-sentence errors for every malformation."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    if not d.exists():
        raise ModelFormatError(f"model directory {d} does not exist.")
    if not d.is_dir():
        raise ModelFormatError(f"{d} is a file, not a model directory (expected {paths.MODEL_META} + {paths.MODEL_WEIGHTS}).")
    mpath, wpath = d / paths.MODEL_META, d / paths.MODEL_WEIGHTS
    for p in (mpath, wpath):
        if not p.is_file():
            raise ModelFormatError(f"model directory {d} has no {p.name}.")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{mpath} is not valid JSON ({e.__class__.__name__}: {e}).") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ModelFormatError(f"{mpath} has no 'kind' entry.")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{wpath} is not a readable safetensors file ({e}).") from None
    return meta, tensors


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Emulator:
    """Load any registered emulator kind from a model directory."""
    meta, tensors = read_model_dir(path)
    kind = meta["kind"]
    if kind not in _KINDS:
        raise ModelFormatError(f"{path}: unknown emulator kind {kind!r} (known: {', '.join(registered_kinds())}).")
    try:
        scaling = meta["scaling"]
        common = dict(
            label_names=meta["label_names"], x_min=scaling["x_min"], x_max=scaling["x_max"],
            wavelength_aa=tensors.pop("wavelength_aa").numpy() if "wavelength_aa" in tensors else meta["wavelength_aa"],
            wavelength_medium=meta["wavelength_medium"], resolution=meta.get("resolution"),
            training_labels=tensors.pop("training_labels").numpy() if "training_labels" in tensors else None,
            model_variance=tensors.pop("model_variance").numpy() if "model_variance" in tensors else None,
            meta={k: v for k, v in meta.items() if k in ("source", "weights_sha256", "created", "name", "notes",
                                                                "flux_normalization")},
        )
        model = _KINDS[kind].from_parts(meta, tensors, common)
    except KeyError as e:
        raise ModelFormatError(f"{path}: model.json or weights lack the entry {e}.") from None
    except (ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{path}: weights do not match model.json ({e}).") from None
    model.meta["weights_sha256"] = meta.get("weights_sha256") or sha256_file(Path(path) / paths.MODEL_WEIGHTS)
    model.meta["path"] = str(Path(path).resolve())
    return model.to(device).eval()
