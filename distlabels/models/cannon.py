"""The Cannon (Ness et al. 2015; Casey et al. 2016) as an emulator kind.

Per pixel p the normalised flux is ``theta[p] . v(u)`` with the quadratic label vector
``v(u) = [1, u_0 .. u_{L-1}, u_i u_j (i <= j, row-major)]`` (T = 1 + L + L(L+1)/2 terms) of the
vectorizer's labels ``u = (label - pivot) / scale`` (pivot: training-set median, scale: its
2.5-97.5 percentile range, as in Casey's code), and an intrinsic scatter ``s2[p]`` that the fit
adds to the data variance (stored as the emulator's ``model_variance``).

Like every kind it takes the interface's scaled labels ``x`` in [-0.5, 0.5] over the training box
and maps them to u by a fixed affine map, so the fit kernel needs nothing Cannon-specific. The
Jacobian is analytic. Its grid is the training spectra's rest-frame grid at the data's
resolution; the pseudo-continuum normalisation used in training (:class:`PseudoContinuum`) is
stored with the model (``model.json`` architecture.normalisation + the ``continuum_mask`` tensor)
so that the test step normalises identically.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError
from ..io.wavelength import to_vacuum
from .base import Emulator, register_kind
from .continuum import PseudoContinuum


def n_terms(n_labels: int) -> int:
    return 1 + n_labels + n_labels * (n_labels + 1) // 2


def quadratic_pairs(n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index vectors (i, j), i <= j, row-major, of the quadratic terms."""
    i, j = torch.triu_indices(n_labels, n_labels)
    return i, j


def label_vector(u: torch.Tensor) -> torch.Tensor:
    """Vectorizer labels u (n, L) -> label vector v (n, T): [1, u, u_i u_j (i <= j)]."""
    i, j = quadratic_pairs(u.shape[1])
    return torch.cat([torch.ones_like(u[:, :1]), u, u[:, i] * u[:, j]], 1)


def label_vector_jacobian(u: torch.Tensor) -> torch.Tensor:
    """d v / d u: (n, T, L). Row 0 is zero, rows 1..L the identity, row (i, j) has u_j at i and u_i at j."""
    n, L = u.shape
    i, j = quadratic_pairs(L)
    jac = torch.zeros(n, n_terms(L), L, dtype=u.dtype, device=u.device)
    jac[:, 1:L + 1] = torch.eye(L, dtype=u.dtype, device=u.device)
    rows = torch.arange(len(i), device=u.device) + 1 + L
    jac[:, rows, i.to(u.device)] += u[:, j]
    jac[:, rows, j.to(u.device)] += u[:, i]
    return jac


@register_kind("cannon")
class CannonModel(Emulator):
    """Quadratic-in-labels spectral model. theta: (n_pix, T); pivot, scale: (n_labels,) physical."""

    def __init__(self, theta, *, pivot, scale, continuum: PseudoContinuum | None = None,
                 l1_regularization=None, theta_cov=None, label_systematic_error=None, **common: Any):
        super().__init__(**common)
        theta = torch.as_tensor(theta)
        if theta.ndim != 2 or theta.shape != (self.n_pix, n_terms(self.n_labels)):
            raise ModelFormatError(f"theta must be (n_pix={self.n_pix}, T={n_terms(self.n_labels)}) for "
                                   f"{self.n_labels} labels; got {tuple(theta.shape)}.")
        pivot = np.asarray(pivot, np.float64)
        scale = np.asarray(scale, np.float64)
        if pivot.shape != (self.n_labels,) or scale.shape != pivot.shape or not np.all(scale > 0):
            raise ModelFormatError("Cannon pivot/scale must be one positive scale and one pivot per label.")
        self.theta = torch.nn.Parameter(theta.float() if theta.dtype not in (torch.float32, torch.float64) else theta,
                                        requires_grad=False)
        self.pivot = pivot
        self.scale_u = scale
        # u = a * x + c maps the interface's scaled labels onto the vectorizer's labels.
        span = self.label_span
        self.register_buffer("u_a", torch.as_tensor(span / scale), persistent=False)
        self.register_buffer("u_c", torch.as_tensor((0.5 * span + self.x_min.numpy() - pivot) / scale),
                             persistent=False)
        self.continuum = continuum
        self.l1_regularization = None if l1_regularization is None else np.asarray(l1_regularization, np.float64)
        # Coefficient covariance from training noise, pixel p ~ cov_scale[p] * cov_ref (T, T):
        # lets the test step remove the bias it causes (see distlabels.fit.cannon).
        self.label_systematic_error = None if label_systematic_error is None else \
            np.asarray(label_systematic_error, np.float64).reshape(self.n_labels)
        self.theta_cov_ref = self.theta_cov_scale = None
        if theta_cov is not None:
            ref, sc = (np.asarray(a, np.float64) for a in theta_cov)
            if ref.shape != (theta.shape[1],) * 2 or sc.shape != (self.n_pix,):
                raise ModelFormatError("cannon theta_cov_ref must be (T, T) and theta_cov_scale (n_pix,).")
            self.theta_cov_ref, self.theta_cov_scale = ref, sc

    # ----- evaluation ----------------------------------------------------------------------
    def to_u(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.u_a.to(x) + self.u_c.to(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled labels (n, L) -> normalised flux (n, n_pix)."""
        v = label_vector(self.to_u(x.to(self.theta.dtype)))
        return v @ self.theta.T

    def value_and_jacobian(self, x: torch.Tensor):
        """Flux (n, n_pix) and d flux / d x (n, n_pix, L), in closed form."""
        u = self.to_u(x.to(self.theta.dtype))
        v = label_vector(u)
        dv = label_vector_jacobian(u) * self.u_a.to(u)[None, None, :]                # (n, T, L)
        n, T, L = dv.shape
        jac = (self.theta @ dv.permute(1, 0, 2).reshape(T, n * L)).reshape(-1, n, L).permute(1, 0, 2)
        return v @ self.theta.T, jac

    def project(self, matrix) -> "CannonModel":
        """The model of ``matrix @ flux`` (matrix (n_out, n_pix), dense or sparse): theta' = M theta."""
        m = matrix if isinstance(matrix, torch.Tensor) else torch.as_tensor(np.asarray(matrix))
        th = self.theta.detach().double().cpu()
        theta = (torch.sparse.mm(m.double().cpu(), th) if m.is_sparse else m.double().cpu() @ th)
        n_out = theta.shape[0]
        out = CannonModel(theta.to(self.theta.dtype), pivot=self.pivot, scale=self.scale_u, continuum=None,
                          label_names=self.label_names, x_min=self.x_min.cpu().numpy(),
                          x_max=self.x_max.cpu().numpy(), wavelength_aa=np.arange(n_out, dtype=float),
                          wavelength_medium=self.wavelength_medium, resolution=self.resolution,
                          training_labels=self.training_labels, meta=self.meta)
        return out.to(self.theta.device)

    @property
    def wavelength_vac(self) -> np.ndarray:
        return to_vacuum(self.wavelength, self.wavelength_medium)

    # ----- persistence ---------------------------------------------------------------------
    def tensors(self):
        t = {"theta": self.theta.data.double()}
        if self.continuum is not None:
            t["continuum_mask"] = torch.as_tensor(np.asarray(self.continuum.mask, np.uint8))
        if self.l1_regularization is not None:
            t["l1_regularization"] = torch.as_tensor(self.l1_regularization)
        if self.theta_cov_ref is not None:
            t["theta_cov_ref"] = torch.as_tensor(self.theta_cov_ref)
            t["theta_cov_scale"] = torch.as_tensor(self.theta_cov_scale)
        return t

    def kind_meta(self):
        return {"vectorizer": {"order": 2, "terms": "1, u_k, u_i*u_j (i <= j, row-major)",
                               "u": "(label - pivot) / scale",
                               "pivot": self.pivot.tolist(), "scale": self.scale_u.tolist()},
                "normalisation": self.continuum.to_meta() if self.continuum is not None else {"method": "none"},
                "label_systematic_error": None if self.label_systematic_error is None
                else self.label_systematic_error.tolist(),
                "rv_frame": "rest"}

    @classmethod
    def from_parts(cls, meta, tensors, common):
        arch = meta.get("architecture", {})
        vec = arch.get("vectorizer", {})
        if "theta" not in tensors or "pivot" not in vec or "scale" not in vec:
            raise ModelFormatError("a cannon model needs the 'theta' tensor and architecture.vectorizer pivot/scale.")
        norm = arch.get("normalisation", {"method": "none"})
        continuum = None
        if norm.get("method") == "chebyshev-continuum-pixels":
            if "continuum_mask" not in tensors:
                raise ModelFormatError("the cannon model's normalisation needs the 'continuum_mask' tensor.")
            lam_vac = to_vacuum(np.asarray(common["wavelength_aa"], np.float64), common["wavelength_medium"])
            continuum = PseudoContinuum(lam_vac, tensors["continuum_mask"].numpy().astype(bool),
                                        tuple(tuple(s) for s in norm["segments_vac_aa"]), int(norm["degree"]),
                                        int(norm.get("min_pixels_per_segment", 10)))
        elif norm.get("method") != "none":
            raise ModelFormatError(f"unknown cannon normalisation method {norm.get('method')!r}.")
        l1 = tensors.get("l1_regularization")
        cov = (tensors["theta_cov_ref"].numpy(), tensors["theta_cov_scale"].numpy()) \
            if "theta_cov_ref" in tensors and "theta_cov_scale" in tensors else None
        return cls(tensors["theta"].float(), pivot=vec["pivot"], scale=vec["scale"], continuum=continuum,
                   l1_regularization=None if l1 is None else l1.numpy(), theta_cov=cov,
                   label_systematic_error=arch.get("label_systematic_error"), **common)
