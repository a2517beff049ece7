"""The Payne's emulator: an MLP from scaled labels to flux (Ting et al. 2019; bossbrain's networks).

Architecture: Linear(L -> H1), act, Linear(H1 -> H2), act, ..., Linear(Hk -> n_pix). The
activation is LeakyReLU (slope 0.01) in the maintained code and bossbrain; sigmoid in the 2018-19
networks. The Jacobian is written out layer by layer (no autograd), batched over stars, and a
linear resampling of the output is folded into the last layer (:meth:`project`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError
from .base import Emulator, register_kind

ACTIVATIONS = ("leaky_relu", "sigmoid", "tanh")


def _act(z: torch.Tensor, name: str, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation value and derivative, both shaped like z."""
    if name == "leaky_relu":
        d = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
        return z * d, d
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s, s * (1 - s)
    t = torch.tanh(z)
    return t, 1 - t * t


@register_kind("payne-mlp")
class PayneMLP(Emulator):
    """MLP emulator. weights: list of (out, in) matrices (torch layout), biases: list of (out,)."""

    def __init__(self, weights, biases, *, activation: str = "leaky_relu", negative_slope: float = 0.01,
                 **common: Any):
        super().__init__(**common)
        if activation not in ACTIVATIONS:
            raise ModelFormatError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)}).")
        if len(weights) != len(biases) or len(weights) < 1:
            raise ModelFormatError("an MLP needs as many bias vectors as weight matrices, at least one.")
        n_in = self.n_labels
        for i, (w, b) in enumerate(zip(weights, biases)):
            if w.ndim != 2 or w.shape[1] != n_in or b.shape != (w.shape[0],):
                raise ModelFormatError(f"layer {i}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not chain "
                                       f"from {n_in} inputs.")
            n_in = w.shape[0]
        if n_in != self.n_pix:
            raise ModelFormatError(f"the network has {n_in} outputs but the wavelength grid has {self.n_pix} pixels.")
        # Stored weights keep a floating dtype they arrive in (float32 from files; float64 after .double()).
        def param(t):
            t = torch.as_tensor(t)
            return torch.nn.Parameter(t if t.is_floating_point() and t.dtype != torch.float16 else t.float(),
                                      requires_grad=False)

        self.weights = torch.nn.ParameterList([param(w) for w in weights])
        self.biases = torch.nn.ParameterList([param(b) for b in biases])
        self.activation = activation
        self.negative_slope = float(negative_slope)

    # CPU matrix products of the last layer: "torch" (its BLAS) or "numpy" (numpy's BLAS, e.g.
    # OpenBLAS, which runs these shapes ~2x faster than MKL on AMD CPUs). The fit kernel picks the
    # faster by timing both once (FitConfig.cpu_matmul); autograd always goes through torch.
    matmul_backend: str = "torch"

    def _last(self, h: torch.Tensor) -> torch.Tensor:
        """h (m, H) @ W_out^T: (m, n_pix), through the chosen CPU backend when autograd is not involved."""
        w = self.weights[-1]
        if (self.matmul_backend == "numpy" and h.device.type == "cpu" and not h.requires_grad
                and not torch.is_grad_enabled()):
            return torch.from_numpy(np.matmul(h.detach().numpy(), self._w_out_numpy()))
        return torch.mm(h, w.T)

    def _w_out_numpy(self) -> np.ndarray:
        """W_out^T (H, n_pix) as a contiguous numpy array (cached)."""
        w = self.weights[-1]
        wt = getattr(self, "_w_out_t", None)
        if wt is None or wt.shape != (w.shape[1], w.shape[0]) or wt.dtype != w.dtype:
            wt = self._w_out_t = w.detach().T.contiguous()
        return wt.numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.weights[0].dtype)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h, _ = _act(torch.addmm(b, h, w.T), self.activation, self.negative_slope)
        if self.matmul_backend == "numpy":
            return self._last(h) + self.biases[-1]
        return torch.addmm(self.biases[-1], h, self.weights[-1].T)

    def value_and_jacobian(self, x: torch.Tensor):
        """Flux (n, n_pix) and d flux / d x (n, n_pix, n_labels), by the chain rule."""
        h = x.to(self.weights[0].dtype)
        a = None  # running d h / d x: (n, H, n_labels)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h, d = _act(torch.addmm(b, h, w.T), self.activation, self.negative_slope)
            a = d[:, :, None] * (w[None] if a is None else torch.matmul(w, a))
        w_out, b_out = self.weights[-1], self.biases[-1]
        y = torch.addmm(b_out, h, w_out.T)
        if a is None:
            return y, w_out[None].expand(len(x), -1, -1)
        # One 2-D product (n_pix, H) @ (H, n*L) instead of a broadcast batched matmul, which would
        # materialise n copies of the large last-layer matrix.
        n, hdim, nl = a.shape
        jac = (w_out @ a.permute(1, 0, 2).reshape(hdim, n * nl)).reshape(-1, n, nl).permute(1, 0, 2)
        return y, jac

    # value_and_jacobian_stacked accepts ``out=`` (a buffer the fit kernel reuses between calls).
    stacked_out = True

    def value_and_jacobian_stacked(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 1 + n_labels, n_pix): flux, then d flux / d x_j, from one product with the last layer.

        The hidden-layer derivatives are carried as (H, n, L) so that every layer is one 2-D
        matrix product; the last layer multiplies [h, dh/dx] of all stars at once. ``out``: an
        optional contiguous (n, 1 + n_labels, n_pix) tensor of the weights' dtype to write into
        (re-used buffers spare the page faults of a fresh ~100 MB result per call on CPU).
        """
        h, a = self.last_hidden(x)   # (n, H), (H, n, L)
        n, nl = a.shape[1], a.shape[2]
        w_out, b_out = self.weights[-1], self.biases[-1]
        stacked = torch.cat([h.T[:, :, None], a], 2).reshape(h.shape[1], n * (1 + nl))   # (H, n (1 + L))
        if out is not None and out.is_contiguous() and out.dtype == w_out.dtype and out.device == stacked.device:
            flat = out.view(n * (1 + nl), -1)
            if self.matmul_backend == "numpy" and flat.device.type == "cpu" and not torch.is_grad_enabled():
                np.matmul(stacked.T.numpy(), self._w_out_numpy(), out=flat.numpy())
            else:
                torch.mm(stacked.T, w_out.T, out=flat)
        else:
            out = self._last(stacked.T).view(n, 1 + nl, -1)
        out[:, 0] += b_out
        return out

    # ----- pieces for the fit kernel's approximate curvature (distlabels.fit.forward) ----------
    def last_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden layer h (n, H) and d h / d x as (H, n, L): the network without its big product."""
        h = x.to(self.weights[0].dtype)
        n, nl = h.shape
        a = None  # carried as (H, n, L): every layer is one 2-D matrix product
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h, d = _act(torch.addmm(b, h, w.T), self.activation, self.negative_slope)
            if a is None:
                a = d.T[:, :, None] * w[:, None, :]
            else:
                a = (w @ a.reshape(a.shape[0], n * nl)).reshape(-1, n, nl) * d.T[:, :, None]
        if a is None:  # no hidden layer: h is x itself
            a = torch.eye(nl, dtype=h.dtype, device=h.device)[:, None, :].expand(nl, n, nl)
        return h, a

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer weight (n_pix, H) and bias (n_pix,)."""
        return self.weights[-1], self.biases[-1]

    def apply_output(self, h: torch.Tensor) -> torch.Tensor:
        """h (m, H) -> W_out h + b_out (m, n_pix), through the chosen CPU backend."""
        return self._last(h) + self.biases[-1]

    def pullback(self, z: torch.Tensor) -> torch.Tensor:
        """z (m, n_pix) -> z @ W_out (m, H): vectors on the output pulled back to the last hidden layer."""
        w = self.weights[-1]
        if (self.matmul_backend == "numpy" and z.device.type == "cpu" and not z.requires_grad
                and not torch.is_grad_enabled()):
            return torch.from_numpy(np.matmul(z.contiguous().numpy(), w.detach().numpy()))
        return torch.mm(z, w)

    def with_inputs(self, matrix, offset) -> "PayneMLP":
        """Fold x = offset + theta @ matrix.T into the first layer: W1' = W1 M, b1' = b1 + W1 offset."""
        w1, b1 = self.weights[0], self.biases[0]
        m = torch.as_tensor(matrix, dtype=torch.float64, device=w1.device)
        o = torch.as_tensor(offset, dtype=torch.float64, device=w1.device)
        w = (w1.double() @ m).to(w1.dtype)
        b = (b1.double() + w1.double() @ o).to(b1.dtype)
        k = m.shape[1]
        common = dict(label_names=[f"theta{i}" for i in range(k)], x_min=[-0.5] * k, x_max=[0.5] * k,
                      wavelength_aa=self.wavelength, wavelength_medium=self.wavelength_medium,
                      resolution=self.resolution, meta=self.meta)
        out = PayneMLP([w] + [p.data for p in self.weights[1:]], [b] + [p.data for p in self.biases[1:]],
                       activation=self.activation, negative_slope=self.negative_slope, **common)
        return out.to(w1.device)

    def project(self, matrix) -> "PayneMLP":
        """Fold ``matrix`` (n_out, n_pix) into the last layer: W' = M W, b' = M b (float64 product)."""
        m = matrix if isinstance(matrix, torch.Tensor) else torch.as_tensor(matrix)
        m = m.to(device=self.weights[-1].device)
        dtype = self.weights[-1].dtype
        w = (m.double() @ self.weights[-1].double()).to(dtype)
        b = (m.double() @ self.biases[-1].double()[:, None])[:, 0].to(dtype)
        n_out = w.shape[0]
        common = dict(label_names=self.label_names, x_min=self.x_min.cpu().numpy(), x_max=self.x_max.cpu().numpy(),
                      wavelength_aa=torch.arange(n_out, dtype=torch.float64).numpy(),
                      wavelength_medium=self.wavelength_medium, resolution=self.resolution,
                      training_labels=self.training_labels, meta=self.meta)
        out = PayneMLP([p.data for p in self.weights[:-1]] + [w], [p.data for p in self.biases[:-1]] + [b],
                       activation=self.activation, negative_slope=self.negative_slope, **common)
        return out.to(self.weights[-1].device)

    # ----- persistence ---------------------------------------------------------------------
    def tensors(self):
        t = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            t[f"layers.{i}.weight"] = w.data
            t[f"layers.{i}.bias"] = b.data
        return t

    def kind_meta(self):
        return {"activation": self.activation, "negative_slope": self.negative_slope,
                "layer_sizes": [self.n_labels] + [int(w.shape[0]) for w in self.weights]}

    @classmethod
    def from_parts(cls, meta, tensors, common):
        arch = meta.get("architecture", {})
        n_layers = len([k for k in tensors if k.startswith("layers.") and k.endswith(".weight")])
        if n_layers == 0:
            raise ModelFormatError("weights.safetensors holds no 'layers.N.weight' tensors for a payne-mlp model.")
        weights = [tensors[f"layers.{i}.weight"] for i in range(n_layers)]
        biases = [tensors[f"layers.{i}.bias"] for i in range(n_layers)]
        return cls(weights, biases, activation=arch.get("activation", "leaky_relu"),
                   negative_slope=arch.get("negative_slope", 0.01), **common)
