"""TransformerPayne (Rozanski et al. 2024): an emulator queried by wavelength.

The network is a function flux(labels, wavelength), not a vector of one value per pixel:

- **wavelength query**: u = ln(lambda / lambda_ref) is embedded with sines and cosines of
  geometrically spaced periods (from ~2 training-grid pixels to a few times the grid's span),
  then a linear map to the model width ``d``;
- **label tokens**: an MLP maps the scaled labels x (n_labels,) to ``n_tokens`` vectors of width
  ``d`` (plus a learned per-token offset);
- **blocks** (pre-layer-norm, residual): cross-attention of each wavelength query to the label
  tokens (``n_heads`` heads), then a per-query MLP; a final layer norm and a linear head give the
  normalised flux.

Because every pixel is an independent query, one trained model evaluates on any wavelength grid
inside its training range (any instrument, any subset of pixels): the flux at a pixel does not
depend on which other pixels are asked for. Evaluation is batched over (n_star, n_pix) and chunked
over pixels so that memory stays bounded (:attr:`TransformerPayne.max_chunk_elements`).

In the fit kernel: :meth:`project` evaluates the network only at the model pixels the working
grid's projection touches (the any-grid property keeps this exact) and applies the projection
after; :meth:`with_inputs` folds the kernel's label map into the token MLP's first layer; the
Jacobian is computed by forward-mode autodiff (``torch.func.jvp``, one tangent per fitted
parameter, vectorised with ``vmap``), chunked over pixels like the forward pass.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelFormatError
from .base import Emulator, ProjectedEmulator, register_kind

ARCH_KEYS = ("d_model", "n_tokens", "n_heads", "n_blocks", "token_hidden", "mlp_ratio", "n_freq")


def _period_grid(wavelength_aa: np.ndarray, n_freq: int) -> tuple[float, np.ndarray]:
    """(ln lambda_ref, periods in ln(lambda)) for a training grid: geometric from 2 pixels to 4 spans."""
    lam = np.asarray(wavelength_aa, np.float64)
    ln = np.log(lam)
    step = float(np.median(np.diff(ln))) if len(ln) > 1 else 1e-4
    span = float(ln[-1] - ln[0]) if len(ln) > 1 else 1.0
    p_min, p_max = 2.0 * step, 4.0 * max(span, 4 * step)
    return float(0.5 * (ln[0] + ln[-1])), np.geomspace(p_min, p_max, n_freq)


class TransformerPayneNet(nn.Module):
    """The trainable network: scaled labels (n, L) and wavelength features (P, 2F) or (n, P, 2F) -> flux (n, P).

    ``features`` come from :meth:`embed` (sin/cos of ln-wavelength), computed once per grid.
    """

    def __init__(self, n_labels: int, *, d_model: int = 64, n_tokens: int = 8, n_heads: int = 4, n_blocks: int = 2,
                 token_hidden: int = 128, mlp_ratio: int = 2, n_freq: int = 32, ln_ref: float = 0.0, periods=None):
        super().__init__()
        if d_model % n_heads:
            raise ModelFormatError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads}).")
        self.arch = dict(d_model=int(d_model), n_tokens=int(n_tokens), n_heads=int(n_heads), n_blocks=int(n_blocks),
                         token_hidden=int(token_hidden), mlp_ratio=int(mlp_ratio), n_freq=int(n_freq))
        self.n_labels, self.d, self.T, self.H = int(n_labels), int(d_model), int(n_tokens), int(n_heads)
        per = np.geomspace(1e-4, 1.0, n_freq) if periods is None else np.asarray(periods, np.float64)
        if per.shape != (n_freq,):
            raise ModelFormatError(f"wavelength embedding has {per.shape} periods, expected ({n_freq},).")
        # Angular frequencies of the embedding, kept in float64 outside the module's tensors so that no
        # dtype cast (.float(), .double()) rounds them: the phase of a 2-pixel period must be exact.
        self.omega = np.asarray(2 * np.pi / per, np.float64)
        self.ln_ref = float(ln_ref)
        self.query_in = nn.Linear(2 * n_freq, d_model)
        self.token_mlp = nn.Sequential(nn.Linear(n_labels, token_hidden), nn.GELU(), nn.Linear(token_hidden, token_hidden),
                                       nn.GELU(), nn.Linear(token_hidden, n_tokens * d_model))
        self.token_offset = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, mlp_ratio) for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)

    @property
    def periods(self) -> np.ndarray:
        """(F,) periods of the embedding in ln(lambda)."""
        return 2 * np.pi / self.omega

    def embed(self, wavelength_aa) -> torch.Tensor:
        """(P,) wavelengths (Angstrom, the model's medium) -> (P, 2F) features in the network's dtype and device."""
        w = self.query_in.weight
        lam = torch.as_tensor(np.asarray(wavelength_aa, np.float64), dtype=torch.float64, device=w.device)
        omega = torch.as_tensor(self.omega, dtype=torch.float64, device=w.device)
        phase = (torch.log(lam) - self.ln_ref)[:, None] * omega[None]
        return torch.cat([torch.sin(phase), torch.cos(phase)], 1).to(w.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled labels (n, L) -> label tokens (n, T, d)."""
        return self.token_mlp(x).view(len(x), self.T, self.d) + self.token_offset

    def decode(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """tokens (n, T, d), features (P, 2F) or (n, P, 2F) -> flux (n, P)."""
        q = self.query_in(features)
        h = q.expand(tokens.shape[0], *q.shape[-2:]) if q.dim() == 2 else q
        for blk in self.blocks:
            h = blk(h, tokens)
        return self.head(self.norm_out(h))[..., 0]

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.decode(self.tokens(x), features)


class _Block(nn.Module):
    """Pre-LN cross-attention (queries: wavelengths; keys/values: label tokens) + MLP, both residual."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.h, self.dh = n_heads, d // n_heads
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.wq = nn.Linear(d, d)
        self.wkv = nn.Linear(d, 2 * d)
        self.wo = nn.Linear(d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n, p, d = h.shape
        t = tokens.shape[1]
        q = self.wq(self.norm_q(h)).view(n, p, self.h, self.dh).transpose(1, 2)              # (n, H, P, dh)
        k, v = self.wkv(self.norm_kv(tokens)).view(n, t, 2, self.h, self.dh).permute(2, 0, 3, 1, 4)  # (n, H, T, dh)
        # Written out (not scaled_dot_product_attention) so that forward-mode autodiff always applies;
        # with a handful of tokens the score matrix is tiny.
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)           # (n, H, P, T)
        h = h + self.wo((att @ v).transpose(1, 2).reshape(n, p, d))
        return h + self.mlp(self.norm_mlp(h))


@register_kind("transformer-payne")
class TransformerPayne(Emulator):
    """Emulator wrapper around :class:`TransformerPayneNet` on a wavelength grid (any grid).

    ``wavelength_aa`` is the grid the model evaluates on by default (its training grid when saved);
    :meth:`on_grid` returns the same network on another grid. ``meta['training_wavelength_range_aa']``
    bounds where it was trained; :meth:`predict` returns NaN outside it.
    """

    # Elements (n_star x pixels x width x tangents) per evaluated chunk: bounds memory (~0.5 GB of float32
    # temporaries at the default on CPU); the fit kernel's batches of 64 stars use chunks of a few hundred pixels.
    max_chunk_elements: int = 1 << 24

    def __init__(self, net: TransformerPayneNet, **common: Any):
        super().__init__(**common)
        if net.n_labels != self.n_labels:
            raise ModelFormatError(f"the network takes {net.n_labels} labels but the model names {self.n_labels}.")
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._features_cache: tuple | None = None
        if "training_wavelength_range_aa" not in self.meta and len(self.wavelength):
            self.meta["training_wavelength_range_aa"] = [float(self.wavelength.min()), float(self.wavelength.max())]

    # ----- evaluation ----------------------------------------------------------------------
    @property
    def features(self) -> torch.Tensor:
        """(n_pix, 2F) wavelength features of this grid, computed once per device and dtype."""
        w = self.net.query_in.weight
        key = (w.device, w.dtype)
        if self._features_cache is None or self._features_cache[0] != key:
            self._features_cache = (key, self.net.embed(self.wavelength))
        return self._features_cache[1]

    def _chunk(self, n: int, tangents: int = 1) -> int:
        per_pix = max(n, 1) * self.net.d * max(self.net.arch["mlp_ratio"], 2) * max(tangents, 1)
        return int(min(max(self.max_chunk_elements // per_pix, 16), max(self.n_pix, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled labels (n, n_labels) -> flux (n, n_pix), pixels in chunks."""
        x = x.to(self.features.dtype)
        tok = self.net.tokens(x)
        step = self._chunk(len(x))
        return torch.cat([self.net.decode(tok, self.features[lo:lo + step])
                          for lo in range(0, self.n_pix, step)], 1)

    def value_and_jacobian_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1 + n_labels, n_pix): flux and d flux / d x_j by forward-mode autodiff.

        One JVP per label direction (vectorised with vmap): the tangent e_j for every star at once
        gives d flux_i / d x_ij for all stars i, since stars are independent.
        """
        from torch.func import jvp, vmap

        x = x.to(self.features.dtype)
        n, nl = x.shape
        eye = torch.eye(nl, dtype=x.dtype, device=x.device)[:, None, :].expand(nl, n, nl)   # (L, n, L)
        step = self._chunk(n, tangents=nl + 1)
        out = torch.empty(n, 1 + nl, self.n_pix, dtype=x.dtype, device=x.device)
        for lo in range(0, self.n_pix, step):
            feats = self.features[lo:lo + step]

            def f(xx, feats=feats):
                return self.net.decode(self.net.tokens(xx), feats)

            def one(t):
                return jvp(f, (x,), (t,))

            y, jac = vmap(one, out_dims=(None, 0), randomness="error")(eye) if nl else (f(x), None)
            out[:, 0, lo:lo + step] = y
            if nl:
                out[:, 1:, lo:lo + step] = jac.transpose(0, 1)
        return out

    def value_and_jacobian(self, x: torch.Tensor):
        s = self.value_and_jacobian_stacked(x)
        return s[:, 0], s[:, 1:].transpose(1, 2)

    @torch.no_grad()
    def predict(self, labels, wavelength_aa=None) -> np.ndarray:
        """Physical labels (n, n_labels) -> flux (n, n_pix) on the model's grid or on ``wavelength_aa``
        (the model's medium), evaluated there directly; NaN outside the training wavelength range."""
        if wavelength_aa is None:
            return super().predict(labels)
        w = np.asarray(wavelength_aa, np.float64)
        lo, hi = self.meta.get("training_wavelength_range_aa", [w.min(), w.max()])
        inside = (w >= lo) & (w <= hi)
        out = np.full((len(np.atleast_2d(labels)), len(w)), np.nan)
        if inside.any():
            out[:, inside] = self.on_grid(w[inside]).predict(labels)
        return out

    # ----- the same network elsewhere ------------------------------------------------------
    def _common(self, **over) -> dict[str, Any]:
        c = dict(label_names=self.label_names, x_min=self.x_min.cpu().numpy(), x_max=self.x_max.cpu().numpy(),
                 wavelength_aa=self.wavelength, wavelength_medium=self.wavelength_medium, resolution=self.resolution,
                 training_labels=self.training_labels, model_variance=None, meta=self.meta)
        c.update(over)
        return c

    def on_grid(self, wavelength_aa, model_variance=None) -> "TransformerPayne":
        """The same network (shared weights) evaluated on ``wavelength_aa`` (n_pix,) in the model's medium."""
        w = np.asarray(wavelength_aa, np.float64)
        out = TransformerPayne(self.net, **self._common(wavelength_aa=w, model_variance=model_variance))
        out.max_chunk_elements = self.max_chunk_elements
        return out.to(self.net.query_in.weight.device)

    def with_inputs(self, matrix, offset) -> "TransformerPayne":
        """Fold x = offset + theta @ matrix.T into the token MLP's first layer (Jacobian of k columns)."""
        lin = self.net.token_mlp[0]
        m = torch.as_tensor(np.asarray(matrix, np.float64), device=lin.weight.device)
        o = torch.as_tensor(np.asarray(offset, np.float64), device=lin.weight.device)
        k = m.shape[1]
        net = TransformerPayneNet(k, **self.net.arch, ln_ref=self.net.ln_ref, periods=self.net.periods).to(
            device=lin.weight.device, dtype=lin.weight.dtype)
        state = {key: v for key, v in self.net.state_dict().items() if not key.startswith("token_mlp.0.")}
        net.load_state_dict(state, strict=False)
        with torch.no_grad():
            net.token_mlp[0].weight.copy_((lin.weight.double() @ m).to(lin.weight.dtype))
            net.token_mlp[0].bias.copy_((lin.bias.double() + lin.weight.double() @ o).to(lin.bias.dtype))
        net = net.to(lin.weight.device)
        out = TransformerPayne(net, **self._common(label_names=[f"theta{i}" for i in range(k)], x_min=[-0.5] * k,
                                                   x_max=[0.5] * k, training_labels=None,
                                                   model_variance=self.model_variance.cpu().numpy()))
        out.max_chunk_elements = self.max_chunk_elements
        return out.to(lin.weight.device).eval()

    def project(self, matrix) -> "ProjectedTransformerPayne":
        """``matrix @ flux`` with the network evaluated only at the model pixels ``matrix`` uses.

        matrix: (n_out, n_pix) torch (dense or sparse COO) or numpy/scipy. The flux at a pixel does
        not depend on the other pixels evaluated, so this equals the full-grid product exactly.
        """
        if isinstance(matrix, torch.Tensor) and matrix.is_sparse:
            mc = matrix.coalesce()
            idx, val, shape = mc.indices().cpu().numpy(), mc.values().cpu().numpy(), tuple(mc.shape)
        else:
            import scipy.sparse as sp

            coo = sp.coo_matrix(matrix.cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix)
            idx, val, shape = np.vstack([coo.row, coo.col]), coo.data, coo.shape
        if shape[1] != self.n_pix:
            raise ValueError(f"projection has {shape[1]} columns, the model {self.n_pix} pixels")
        cols = np.unique(idx[1])
        remap = np.full(self.n_pix, -1)
        remap[cols] = np.arange(len(cols))
        sub = torch.sparse_coo_tensor(np.vstack([idx[0], remap[idx[1]]]), val, size=(shape[0], len(cols)),
                                      dtype=torch.float64, check_invariants=False).coalesce()
        mv = self.model_variance.cpu().numpy()[cols]
        return ProjectedTransformerPayne(self.on_grid(self.wavelength[cols], model_variance=mv), sub)

    # ----- persistence ---------------------------------------------------------------------
    def tensors(self):
        return {**{f"net.{k}": v for k, v in self.net.state_dict().items()},
                "net.omega": torch.as_tensor(self.net.omega, dtype=torch.float64)}

    def kind_meta(self):
        return {**self.net.arch, "ln_ref": self.net.ln_ref, "query": "sin/cos of ln(lambda / lambda_ref)",
                "training_wavelength_range_aa": self.meta.get("training_wavelength_range_aa")}

    @classmethod
    def from_parts(cls, meta, tensors, common):
        arch = meta.get("architecture", {})
        missing = [k for k in ARCH_KEYS if k not in arch]
        if missing:
            raise ModelFormatError(f"model.json architecture lacks {', '.join(missing)} for a transformer-payne model.")
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        if "omega" not in state:
            raise ModelFormatError("weights.safetensors holds no 'net.*' tensors for a transformer-payne model.")
        periods = 2 * np.pi / state.pop("omega").double().numpy()
        net = TransformerPayneNet(len(common["label_names"]), **{k: int(arch[k]) for k in ARCH_KEYS},
                                  ln_ref=float(arch.get("ln_ref", 0.0)), periods=periods)
        net.load_state_dict(state)
        rng = arch.get("training_wavelength_range_aa")
        if rng:
            common = {**common, "meta": {**common.get("meta", {}), "training_wavelength_range_aa": list(rng)}}
        return cls(net, **common)


class ProjectedTransformerPayne(ProjectedEmulator):
    """``matrix @ tp(x)`` where ``tp`` is a TransformerPayne on the few pixels the matrix reads.

    Keeps :meth:`with_inputs` folded into the network and the Jacobian in the kernel's stacked
    layout, so the kernel sees the same interface as a projected MLP.
    """

    kind = "projected-transformer-payne"

    def __init__(self, base: TransformerPayne, matrix):
        super().__init__(base, matrix)
        # Keep the projection in its own precision (the generic wrapper stores float32); each product
        # casts it to the network's dtype, so a float64 model stays float64 throughout.
        m = matrix if isinstance(matrix, torch.Tensor) else torch.as_tensor(np.asarray(matrix))
        self.register_buffer("matrix", m, persistent=False)

    def value_and_jacobian_stacked(self, x):
        s = self.base.value_and_jacobian_stacked(x)          # (n, 1 + L, n_sub)
        n, r, p = s.shape
        m = self.matrix.to(s.dtype)
        return (m @ s.reshape(n * r, p).T).T.reshape(n, r, -1)

    def value_and_jacobian(self, x):
        s = self.value_and_jacobian_stacked(x)
        return s[:, 0], s[:, 1:].transpose(1, 2)

    def with_inputs(self, matrix, offset):
        return ProjectedTransformerPayne(self.base.with_inputs(matrix, offset), self.matrix)
