"""DD-Payne: a Payne network trained on observed spectra of reference stars, its gradient spectra tied
to those of an ab initio emulator (Xiang et al. 2019; Zhang et al. 2024).

Reference stars carry labels from another survey (joined on ``source_id`` by
:func:`distlabels.train.data.load_training_set`). Their labels correlate (in real surveys [alpha/M]
falls with [M/H]), so a network fitted to their spectra alone can learn an abundance from the
features of a label it correlates with, and then measures that abundance wrongly on stars that do
not follow the correlation. DD-Payne adds a penalty that makes the network's derivative spectra at
the reference stars look like those of a physical model::

    loss = 1 / (N n_pix) sum_n [ chi2_n + D sum_l sum_p |dF_NN/dx_l - dF_prior/dx_l|_np ]
    chi2_n = sum_p ivar_np (f_np - c_n(lambda_p) F_NN(x_n)_p)^2

* ``F_NN`` is continuum-normalised flux, like every emulator: the fit kernel multiplies a model by a
  Chebyshev continuum per segment that it fits with the labels, so the loss does the same. Each
  star's continuum c_n (Chebyshev, ``continuum_degree`` per segment, the kernel's basis) is solved by
  weighted linear least squares at the current network, per minibatch; the loss's gradient with
  respect to the weights at that optimum does not depend on c_n (envelope theorem), so c_n is held.
  Training and fitting thus see the network the same way, and its gradient spectra are comparable
  with the prior's (also normalised flux).
* Gradients are with respect to the network's scaled labels x = (l - l_min) / (l_max - l_min) - 0.5
  (its reference-label box): each label's term is the flux change across the reference range, so
  one D weighs every label alike. The prior's physical gradients are scaled to that. Network
  gradients come from forward-mode autograd (``torch.func.jvp``, vmapped over the label
  directions, batched over stars), differentiable with respect to the weights.
* The prior (any emulator kind, e.g. bossbrain imported with ``distlabels models import``) is
  projected once onto the data grid (Gaussian LSF to the data's resolving power, then interpolation:
  :func:`prior_on_grid`), in vacuum, rest frame. Labels are matched by name; the network's labels
  the prior lacks get no gradient term; the prior's labels the network lacks are held at
  ``prior_fixed`` (default: the prior's training-label median). Reference stars outside the prior's
  label box get no gradient term (the prior would extrapolate).

The result is an ordinary ``payne-mlp`` (:class:`distlabels.models.PayneMLP`) on the data's own grid
and resolution, loadable with :func:`distlabels.models.load` and fitted by ``distlabels fit``.
Its ``model_variance`` is the held-out stars' residual variance beyond their noise, per pixel.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..config import DDPayneTrainConfig
from ..errors import DistlabelsError
from ..fit.working_grid import build_working_grid, chebyshev_basis
from ..io.wavelength import to_vacuum
from ..models.base import Emulator
from ..models.continuum import rough_continuum
from ..models.payne import PayneMLP
from .cannon import default_segments
from .data import TrainingSet, shift_to_rest
from .loop import LoopConfig, LoopResult, train_loop
from .payne import PayneNet, split

DEAD_PIXEL_VARIANCE = 1.0e4      # model variance of a pixel no reference star constrains: weight ~0 in fits


# ------------------------------------------------------------------------------ the prior on the data grid
def interpolation_matrix(src_aa: np.ndarray, dst_aa: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(n_dst, n_src) linear interpolation from an increasing grid, and (n_dst,) bool inside it."""
    src = np.asarray(src_aa, np.float64)
    dst = np.asarray(dst_aa, np.float64)
    j = np.clip(np.searchsorted(src, dst) - 1, 0, len(src) - 2)
    t = np.clip((dst - src[j]) / (src[j + 1] - src[j]), 0, 1)
    inside = (dst >= src[0]) & (dst <= src[-1])
    rows = np.repeat(np.arange(len(dst)), 2)
    m = sp.csr_matrix((np.stack([1 - t, t], 1).ravel(), (rows, np.stack([j, j + 1], 1).ravel())),
                      shape=(len(dst), len(src)))
    return m, inside


def prior_on_grid(prior: Emulator, wavelength_aa, wavelength_medium: str, resolution: float | None):
    """(emulator whose output is on the data pixels, (n_pix,) bool pixels the prior covers).

    The prior is convolved with a Gaussian LSF of the data's resolving power (the quadrature
    difference with its own; the fit kernel's convention: constant R in ln lambda) on a 4x
    oversampled uniform log grid, then interpolated linearly onto the data pixels (vacuum, rest frame).
    """
    lam_p = to_vacuum(prior.wavelength, prior.wavelength_medium)
    lam_d = to_vacuum(np.asarray(wavelength_aa, np.float64), wavelength_medium)
    if lam_d.max() < lam_p[0] or lam_d.min() > lam_p[-1]:
        raise DistlabelsError(f"the prior's wavelengths ({lam_p[0]:.0f}-{lam_p[-1]:.0f} A) do not overlap the "
                              f"spectra's ({lam_d.min():.0f}-{lam_d.max():.0f} A).")
    needs_lsf = resolution is not None and resolution > 0 and (prior.resolution is None or prior.resolution > resolution)
    if needs_lsf:
        g = build_working_grid(lam_p, lam_d, resolution=resolution, model_resolution=prior.resolution, oversample=4,
                               v_max_kms=0.0)
        lam_w = 10 ** g.log10_wavelength
        interp, inside = interpolation_matrix(lam_w, lam_d)
        matrix = interp @ g.projection
        cov = (interp @ sp.diags(g.covered.astype(float))).sum(1).A1 > 0.999
        covered = inside & cov
    else:
        matrix, covered = interpolation_matrix(lam_p, lam_d)
    coo = matrix.tocoo()
    m = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, size=coo.shape, dtype=torch.float64,
                                check_invariants=False)
    return prior.project(m.coalesce()), covered


class PriorGradients:
    """Gradient spectra of the prior at given labels, in the DD network's scaled units, on the data grid.

    ``__call__(labels (n, L) physical) -> (flux (n, n_pix), grad (n, L, n_pix), use (n,) bool)``;
    rows of ``grad`` for labels without a prior term are 0 (``label_mask`` says which have one).
    """

    def __init__(self, prior: Emulator, label_names, span_dd, wavelength_aa, wavelength_medium, resolution,
                 gradient_labels=None, prior_fixed=()):
        self.model, self.covered = prior_on_grid(prior, wavelength_aa, wavelength_medium, resolution)
        self.model = self.model.float().eval()
        names = list(label_names)
        wanted = list(gradient_labels) if gradient_labels else [n for n in names if n in prior.label_names]
        bad = [n for n in wanted if n not in prior.label_names or n not in names]
        if bad:
            raise DistlabelsError(f"gradient label(s) {', '.join(bad)} are not labels of both the network and the "
                                  f"prior (prior labels: {', '.join(prior.label_names)}).")
        if not wanted:
            raise DistlabelsError(f"the prior shares no label with the training labels ({', '.join(names)}); "
                                  f"its labels are {', '.join(prior.label_names)}.")
        self.label_mask = np.array([n in wanted for n in names])                       # (L,)
        self.index = np.array([prior.label_names.index(n) if n in prior.label_names else -1 for n in names])
        tl = prior.training_labels
        fixed = np.median(tl, 0) if len(tl) else prior.label_bounds.mean(1)
        for name, value in prior_fixed:
            if name not in prior.label_names:
                raise DistlabelsError(f"prior_fixed: the prior has no label {name!r}.")
            fixed[prior.label_names.index(name)] = float(value)
        self.fixed = fixed                                                             # (L_prior,) physical
        self.box = prior.label_bounds
        span_p = prior.label_span
        self.factor = torch.as_tensor(np.where(self.label_mask, np.asarray(span_dd) / span_p[np.maximum(self.index, 0)],
                                               0.0), dtype=torch.float32)             # (L,) d x_prior / d x_dd

    def prior_label_array(self, labels: np.ndarray) -> np.ndarray:
        lab = np.broadcast_to(self.fixed, (len(labels), len(self.fixed))).copy()
        m = self.index >= 0
        lab[:, self.index[m]] = np.asarray(labels)[:, m]
        return lab

    @torch.no_grad()
    def __call__(self, labels: np.ndarray):
        lab = self.prior_label_array(labels)
        lo, hi = self.box.T
        tol = 1e-9 * (hi - lo)
        use = np.all((lab >= lo - tol) & (lab <= hi + tol), axis=1)
        x = self.model.scale(torch.as_tensor(lab)).float()
        st = self.model.value_and_jacobian_stacked(x).float()                        # (n, 1 + L_prior, n_pix)
        idx = torch.as_tensor(np.maximum(self.index, 0))
        grad = st[:, 1:][:, idx] * self.factor[None, :, None]
        return st[:, 0], grad, torch.as_tensor(use)

    def cached(self, labels: np.ndarray, chunk: int = 256):
        outs = [self(labels[lo:lo + chunk]) for lo in range(0, len(labels), chunk)]
        return torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])


# ------------------------------------------------------------------------------ network gradients and the loss
def value_and_gradients(net: torch.nn.Module, x: torch.Tensor):
    """Network flux (n, n_pix) and its gradient spectra d flux / d x (n, L, n_pix), differentiable
    with respect to the weights.

    A :class:`PayneNet` carries the tangents through its layers by hand (forward mode: the value and
    the L label directions share one product with the large last layer); any other module goes
    through ``torch.func.jvp``, one jvp per label direction, vmapped. Both are exact.
    """
    if isinstance(net, PayneNet):
        return _mlp_value_and_gradients(net, x)
    from torch.func import jvp, vmap

    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)

    def along(v):
        return jvp(net, (x,), (v.expand_as(x),))

    y, tangents = vmap(along)(eye)                                   # (L, n, n_pix) each
    return y[0], tangents.permute(1, 0, 2)


def _activation_derivative(net: PayneNet, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if net.activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, net.negative_slope))
    if net.activation == "sigmoid":
        return h * (1 - h)
    return 1 - h * h


def _mlp_value_and_gradients(net: PayneNet, x: torch.Tensor):
    n, L = x.shape
    h, t = x, None                                   # t: tangents d h / d x, (n, L, H)
    for layer in net.layers[:-1]:
        z = layer(h)
        h = net.act(z)
        d = _activation_derivative(net, z, h)
        t = (layer.weight.T[None] if t is None else t @ layer.weight.T) * d[:, None, :]
    last = net.layers[-1]
    if t is None:
        return last(h), last.weight.T[None].expand(n, -1, -1)
    out = torch.cat([h[:, None, :], t], 1) @ last.weight.T           # (n, 1 + L, n_pix): one product
    return out[:, 0] + last.bias, out[:, 1:]


def solve_continuum(model_flux: torch.Tensor, flux: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor,
                    bb: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """Each star's continuum c_n = B a_n minimising sum_p w (f - c F)^2: (n, n_pix).

    model_flux, flux, weight: (n, n_pix); basis (n_pix, K); bb (n_pix, K*K) packed products B_i B_j.
    """
    K = basis.shape[1]
    wf = weight * model_flux
    lhs = (wf * model_flux) @ bb                                    # (n, K*K)
    lhs = lhs.reshape(-1, K, K)
    rhs = (wf * flux) @ basis
    scale = lhs.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-30)
    lhs = lhs + ridge * scale[:, None, None] * torch.eye(K, dtype=lhs.dtype, device=lhs.device)
    a = torch.linalg.solve(lhs.double(), rhs.double()[:, :, None])[:, :, 0].to(flux.dtype)
    return a @ basis.T


def dd_payne_loss(net, x, flux, weight, basis, bb, prior_grad, prior_use, grad_mask, gradient_weight: float):
    """(scalar loss, parts dict) of one minibatch (the module docstring's formula).

    x (n, L) scaled labels; flux, weight (n, n_pix) rest-frame observed flux and its inverse variance
    (0 = unusable); prior_grad (n, L, n_pix) or None; prior_use (n,) bool; grad_mask (L, n_pix): 1 where
    a label's gradient is tied to the prior at a pixel (labels the prior has, pixels it covers).
    """
    n_pix = flux.shape[1]
    if gradient_weight > 0 and prior_grad is not None:
        model, grad = value_and_gradients(net, x)
    else:
        model, grad = net(x), None
    with torch.no_grad():
        cont = solve_continuum(model.detach(), flux, weight, basis, bb)
    chi2 = (weight * (flux - cont * model) ** 2).sum(1)              # (n,)
    per_star = chi2
    gpart = torch.zeros_like(chi2)
    if grad is not None:
        diff = (grad - prior_grad).abs() * grad_mask[None]
        gpart = diff.sum((1, 2)) * prior_use
        per_star = chi2 + gradient_weight * gpart
    loss = per_star.sum() / (len(x) * n_pix)
    return loss, {"chi2": chi2.detach(), "gradient": gpart.detach(), "continuum": cont}


# ------------------------------------------------------------------------------ training
@dataclass
class DDPayneReport:
    n_train: int
    n_validation: int
    n_pix: int
    label_names: tuple[str, ...]
    gradient_labels: tuple[str, ...]
    gradient_weight: float
    n_outside_prior: int                # reference stars without a gradient term (outside the prior's box)
    validation_chi2_per_pixel: float    # held-out stars, at the best epoch
    validation_gradient_per_pixel: float
    loop: LoopResult
    device: str
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        g = (f"gradient prior on {','.join(self.gradient_labels)} (D = {self.gradient_weight:g}; "
             f"{self.n_outside_prior} stars outside the prior's box)" if self.gradient_weight > 0 else "no gradient prior")
        return (f"{self.n_train} train / {self.n_validation} validation reference stars x {self.n_pix} px, "
                f"labels {','.join(self.label_names)}, {g}; {self.loop.epochs_run} epochs (best {self.loop.best_epoch}"
                f"{', stopped early' if self.loop.stopped_early else ''}) in {self.loop.seconds:.1f} s on {self.device}; "
                f"held-out chi2/pixel {self.validation_chi2_per_pixel:.3f}, gradient term/pixel "
                f"{self.validation_gradient_per_pixel:.3g}")


def prepare_reference(ts: TrainingSet, degree: int):
    """Rest-frame flux, ivar (n, n_pix) float32 torch, the continuum basis (n_pix, K) and the
    initial output (median roughly normalised spectrum, (n_pix,))."""
    rv = np.zeros(len(ts)) if ts.rv_kms is None else np.asarray(ts.rv_kms, np.float64)
    f, w = shift_to_rest(ts.flux, ts.ivar, ts.wavelength_aa, rv)
    f = torch.where(w > 0, f, torch.zeros_like(f))
    lam_vac = to_vacuum(ts.wavelength_aa, ts.wavelength_medium)
    segs = default_segments(lam_vac, [to_vacuum(np.asarray(s, np.float64), ts.wavelength_medium)
                                      for s in ts.segments] if ts.segments else None)
    basis, seg_of = chebyshev_basis(lam_vac, segs, degree)
    w = torch.where(torch.as_tensor(seg_of >= 0)[None], w, torch.zeros_like(w))
    rough = rough_continuum(f.numpy(), w.numpy(), lam_vac, segs, degree=degree)
    norm = torch.where(w > 0, f / rough.clamp_min(1e-30), torch.full_like(f, float("nan")))
    start = torch.nan_to_num(torch.nanmedian(norm, 0).values, nan=1.0)
    return f.float(), w.float(), torch.as_tensor(basis, dtype=torch.float32), start.float()


def train_dd_payne(ts: TrainingSet, prior: Emulator | None, config: DDPayneTrainConfig | None = None, *,
                   device="cpu", out_dir=None, resume: bool = False, progress: bool = True,
                   meta: dict | None = None):
    """Train a DD-Payne network on reference stars; returns (PayneMLP, DDPayneReport).

    prior: the ab initio emulator (None, or config.gradient_weight 0: a plain data-driven Payne).
    out_dir: checkpoints go to ``out_dir/checkpoint``; resume continues from there.
    """
    cfg = config or DDPayneTrainConfig()
    from ..fit.registry import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    labels = np.ascontiguousarray(ts.labels, np.float64)
    n, L = labels.shape
    if n < 10:
        raise DistlabelsError(f"{n} reference stars are too few to train and validate a network.")
    x_min, x_max = labels.min(0), labels.max(0)
    const = [name for name, a, b in zip(ts.label_names, x_min, x_max) if not b > a]
    if const:
        raise DistlabelsError(f"label(s) {', '.join(const)} take one value across the reference stars; drop them.")
    if cfg.gradient_weight < 0:
        raise DistlabelsError("--gradient-weight must be >= 0.")
    use_prior = prior is not None and cfg.gradient_weight > 0
    x = ((labels - x_min) / (x_max - x_min) - 0.5).astype(np.float32)
    flux, ivar, basis, start = prepare_reference(ts, cfg.continuum_degree)
    n_pix = flux.shape[1]
    pg = None
    grad_cache = use_cache = None
    grad_mask = torch.zeros(L, n_pix, dtype=torch.float32)
    timings = {"prepare_s": time.perf_counter() - t0}
    if use_prior:
        pg = PriorGradients(prior, ts.label_names, x_max - x_min, ts.wavelength_aa, ts.wavelength_medium,
                            ts.resolution, cfg.gradient_labels, cfg.prior_fixed)
        # Labels the prior lacks and pixels it does not cover get no gradient term.
        grad_mask = (torch.as_tensor(pg.label_mask, dtype=torch.float32)[:, None]
                     * torch.as_tensor(pg.covered, dtype=torch.float32)[None])
        if n * L * n_pix * 4 / 2 ** 20 <= cfg.prior_cache_mb:
            t1 = time.perf_counter()
            grad_cache, use_cache = pg.cached(labels)
            timings["prior_s"] = time.perf_counter() - t1
    tr, va = split(n, cfg.validation_fraction, cfg.seed)
    T = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
    basis_d = basis.to(dev)
    K = basis.shape[1]
    ii, jj = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    bb = (basis[:, ii.reshape(-1)] * basis[:, jj.reshape(-1)]).to(dev)
    mask_d = grad_mask.to(dev)
    idx_all = torch.arange(n)

    def prior_of(idx):
        if not use_prior:
            return None, None
        if grad_cache is not None:
            return grad_cache[idx.cpu()].to(dev), use_cache[idx.cpu()].to(dev)
        _, g, u = pg(labels[idx.cpu().numpy()])
        return g.to(dev), u.to(dev)

    torch.manual_seed(cfg.seed)
    net = PayneNet(L, tuple(cfg.hidden), n_pix, cfg.activation, cfg.negative_slope)
    with torch.no_grad():       # start from the reference stars' median normalised spectrum
        net.layers[-1].bias.copy_(start)
        net.layers[-1].weight.mul_(0.1)
    net = net.to(dev)
    D = float(cfg.gradient_weight) if use_prior else 0.0

    def batch_loss(m, xb, fb, wb, ib):
        g, u = prior_of(ib)
        loss, _ = dd_payne_loss(m, xb, fb, wb, basis_d, bb, g, u, mask_d, D)
        return loss

    xv, fv, wv, iv = T(x[va]), flux[va].to(dev), ivar[va].to(dev), idx_all[va]

    def validate(m):
        chi2 = gsum = 0.0
        resid = torch.zeros(n_pix, dtype=torch.float64, device=dev)
        cnt = torch.zeros(n_pix, dtype=torch.float64, device=dev)
        for lo in range(0, len(xv), 256):
            sl = slice(lo, lo + 256)
            g, u = prior_of(iv[sl])
            _, parts = dd_payne_loss(m, xv[sl], fv[sl], wv[sl], basis_d, bb, g, u, mask_d, D)
            chi2 += float(parts["chi2"].sum())
            gsum += float(parts["gradient"].sum())
            # Residual variance beyond the noise, in normalised flux: the emulator's own error per pixel.
            c = parts["continuum"]
            ok = (wv[sl] > 0) & (c > 0)
            r = torch.where(ok, fv[sl] / c.clamp_min(1e-30) - m(xv[sl]), torch.zeros_like(c))
            var = torch.where(ok, 1 / (wv[sl] * c * c).clamp_min(1e-30), torch.zeros_like(c))
            resid += (r * r - var).double().sum(0)
            cnt += ok.double().sum(0)
        denom = len(xv) * n_pix
        score = (chi2 + D * gsum) / denom
        mv = torch.where(cnt > 0, (resid / cnt.clamp_min(1)).clamp_min(0), torch.full_like(cnt, DEAD_PIXEL_VARIANCE))
        return score, {"chi2_per_pixel": chi2 / denom, "gradient_per_pixel": gsum / denom,
                       "model_variance": mv.cpu().tolist()}

    loop_cfg = LoopConfig.of(cfg)
    run_meta = {"kind": "payne-mlp", "method": "dd-payne", "label_names": list(ts.label_names), "n_pix": int(n_pix),
                "hidden": list(cfg.hidden), "dd_payne_config": asdict(cfg)}
    t1 = time.perf_counter()
    result = train_loop(net, batch_loss, (T(x[tr]), flux[tr].to(dev), ivar[tr].to(dev), idx_all[tr].to(dev)),
                        validate, loop_cfg, checkpoint_dir=out_dir, resume=resume, progress=progress,
                        desc="train dd-payne", run_meta=run_meta)
    timings["train_s"] = time.perf_counter() - t1
    with torch.no_grad():
        _, ex = validate(net)
    weights = [layer.weight.detach().cpu().float() for layer in net.layers]
    biases = [layer.bias.detach().cpu().float() for layer in net.layers]
    n_outside = int((~use_cache).sum()) if use_cache is not None else (
        int((~pg(labels)[2]).sum()) if use_prior else 0)
    grad_labels = tuple(np.asarray(ts.label_names)[pg.label_mask]) if use_prior else ()
    info = {"method": "dd-payne", "n_train": int(len(tr)), "n_validation": int(len(va)),
            "gradient_weight": D, "gradient_labels": list(grad_labels), "n_outside_prior_box": n_outside,
            "prior": None if prior is None else {"model_id": prior.model_id, "path": prior.meta.get("path"),
                                                 "labels": list(prior.label_names)},
            "validation_chi2_per_pixel": ex["chi2_per_pixel"], "validation_gradient_per_pixel": ex["gradient_per_pixel"],
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "seconds": result.seconds,
            "config": asdict(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **ts.notes}
    model = PayneMLP(weights, biases, activation=cfg.activation, negative_slope=cfg.negative_slope,
                     label_names=ts.label_names, x_min=x_min, x_max=x_max, wavelength_aa=ts.wavelength_aa,
                     wavelength_medium=ts.wavelength_medium, resolution=ts.resolution, training_labels=labels,
                     model_variance=np.asarray(ex["model_variance"]),
                     meta={**(meta or {}), "training": info})
    report = DDPayneReport(n_train=len(tr), n_validation=len(va), n_pix=n_pix, label_names=tuple(ts.label_names),
                           gradient_labels=grad_labels, gradient_weight=D, n_outside_prior=n_outside,
                           validation_chi2_per_pixel=ex["chi2_per_pixel"],
                           validation_gradient_per_pixel=ex["gradient_per_pixel"], loop=result, device=str(dev),
                           timings={**timings, "total_s": time.perf_counter() - t0})
    return model, report


# ------------------------------------------------------------------------------ diagnostics
def gradient_spectra(model: Emulator, labels, label_names, wavelength_aa=None, wavelength_medium=None,
                     resolution=None):
    """Flux (n, n_pix) and physical gradient spectra d flux / d label (n, len(label_names), n_pix) of
    ``model`` at physical ``labels`` (n, model.n_labels), optionally projected onto another grid."""
    m = model
    if wavelength_aa is not None:
        m, _ = prior_on_grid(model, wavelength_aa, wavelength_medium, resolution)
    m = m.float()
    x = m.scale(torch.as_tensor(np.asarray(labels, np.float64))).float()
    with torch.no_grad():
        st = m.value_and_jacobian_stacked(x).double()
    idx = [model.label_names.index(n) for n in label_names]
    span = torch.as_tensor(model.label_span[idx])
    return st[:, 0].numpy(), (st[:, 1:][:, idx] / span[None, :, None]).numpy()


def gradient_correlation(grad_a: np.ndarray, grad_b: np.ndarray, flux: np.ndarray, basis: np.ndarray,
                         pixels: np.ndarray | None = None) -> np.ndarray:
    """Per star and label, the Pearson correlation over pixels of two gradient spectra (n, L, n_pix)
    after removing from both what a fitted continuum absorbs (span of flux x basis, per star).

    flux (n, n_pix): the model flux each gradient multiplies the continuum of; basis (n_pix, K).
    Returns (n, L).
    """
    sel = np.ones(grad_a.shape[-1], bool) if pixels is None else np.asarray(pixels, bool)
    out = np.empty(grad_a.shape[:2])
    B = basis[sel]
    for i in range(len(grad_a)):
        A = flux[i, sel][:, None] * B
        q, _ = np.linalg.qr(A)
        for j in range(grad_a.shape[1]):
            a, b = grad_a[i, j, sel], grad_b[i, j, sel]
            a = a - q @ (q.T @ a)
            b = b - q @ (q.T @ b)
            out[i, j] = np.corrcoef(a, b)[0, 1]
    return out
