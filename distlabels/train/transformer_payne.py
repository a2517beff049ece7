"""Training TransformerPayne (Rozanski et al. 2024) on a grid of spectra, or fine-tuning a trained one.

The network (:class:`distlabels.models.transformer_payne.TransformerPayneNet`) predicts the flux at
one wavelength for one set of labels, so a training sample is one grid spectrum with a random block
of ``pixels_per_sample`` of its pixels: the pixels are split once (seeded) into blocks, and an epoch
visits every (spectrum, block) pair once, i.e. every pixel of every training spectrum. Loss: L1 on
normalised flux over usable pixels (The Payne's); held-out validation MAE picks the best epoch and
stops the run; the generic loop (:func:`distlabels.train.loop.train_loop`) gives Adam/RAdam, plateau
halving of the learning rate, and exact resume from ``OUT/checkpoint``.

Fine-tuning (``init``): start from a trained TransformerPayne's weights, label scaling and
wavelength embedding (same label names required) and train on another grid, typically smaller or on
another instrument's wavelengths; the network's shape is the initial model's.

The result is a ``transformer-payne`` model on the grid's wavelengths whose per-pixel
``model_variance`` is the validation mean squared emulation error.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..config import TransformerPayneTrainConfig
from ..errors import DistlabelsError
from ..models.transformer_payne import TransformerPayne, TransformerPayneNet, _period_grid
from .data import TrainingSet
from .loop import LoopConfig, LoopResult, PixelErrors, train_loop
from .payne import grid_labels, label_box, split


@dataclass
class TransformerPayneTrainReport:
    n_train: int
    n_validation: int
    n_pix: int
    n_labels: int
    architecture: dict
    n_parameters: int
    validation_mae: float                  # overall, normalised flux
    mae_per_pixel: np.ndarray              # (n_pix,)
    loop: LoopResult
    device: str
    init: str | None = None
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        p = np.nanpercentile(self.mae_per_pixel, [50, 90, 99])
        a = self.architecture
        return (f"{self.n_train} train / {self.n_validation} validation spectra x {self.n_pix} px, {self.n_labels} labels, "
                f"d {a['d_model']}, {a['n_tokens']} tokens, {a['n_blocks']} blocks ({self.n_parameters:,} parameters"
                f"{', fine-tuned from ' + self.init if self.init else ''}), {self.loop.epochs_run} epochs "
                f"(best {self.loop.best_epoch}{', stopped early' if self.loop.stopped_early else ''}) in "
                f"{self.loop.seconds:.1f} s on {self.device}; validation MAE {self.validation_mae:.3e} (per pixel: "
                f"median {p[0]:.2e}, 90% {p[1]:.2e}, 99% {p[2]:.2e})")


def _blocks(n_pix: int, size: int, seed: int) -> np.ndarray:
    """(n_blocks, size) pixel indices: a seeded permutation cut into blocks, the last one topped up
    from the start of the permutation (so a few pixels appear twice per epoch)."""
    perm = np.random.default_rng(seed).permutation(n_pix)
    size = max(min(int(size), n_pix), 1)
    nb = -(-n_pix // size)
    return np.concatenate([perm, perm[: nb * size - n_pix]]).reshape(nb, size)


def train_transformer_payne(ts: TrainingSet, config: TransformerPayneTrainConfig | None = None, *, device="cpu",
                            out_dir=None, resume: bool = False, progress: bool = True,
                            init: TransformerPayne | None = None, meta: dict | None = None):
    """Train (or, with ``init``, fine-tune) a TransformerPayne; returns (TransformerPayne, report).

    out_dir: where checkpoints go (``out_dir/checkpoint``); resume continues from there.
    """
    cfg = config or TransformerPayneTrainConfig()
    from ..fit.registry import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    labels = grid_labels(ts)
    n, L = labels.shape
    if init is not None:
        if tuple(init.label_names) != tuple(ts.label_names):
            raise DistlabelsError(f"--init model has labels {','.join(init.label_names)} but the grid is trained on "
                                  f"{','.join(ts.label_names)}; use the same --labels.")
        if init.wavelength_medium != ts.wavelength_medium:
            raise DistlabelsError(f"--init model's wavelengths are in {init.wavelength_medium}, the grid's in "
                                  f"{ts.wavelength_medium}.")
        x_min, x_max = init.x_min.cpu().numpy(), init.x_max.cpu().numpy()
    else:
        x_min, x_max = label_box(ts.label_names, labels)
    x = (labels - x_min) / (x_max - x_min) - 0.5
    flux = np.asarray(ts.flux, np.float32)
    usable = np.isfinite(flux) & (np.asarray(ts.ivar) > 0)
    flux = np.where(usable, flux, 1.0).astype(np.float32)
    n_pix = flux.shape[1]
    wave = np.asarray(ts.wavelength_aa, np.float64)
    if np.any(np.diff(wave) <= 0):
        raise DistlabelsError("the grid's wavelengths must increase strictly.")

    torch.manual_seed(cfg.seed)
    if init is not None:
        arch = dict(init.net.arch)
        net = TransformerPayneNet(L, **arch, ln_ref=init.net.ln_ref, periods=init.net.periods)
        net.load_state_dict(init.net.state_dict())
    else:
        arch = dict(d_model=cfg.d_model, n_tokens=cfg.n_tokens, n_heads=cfg.n_heads, n_blocks=cfg.n_blocks,
                    token_hidden=cfg.token_hidden, mlp_ratio=cfg.mlp_ratio, n_freq=cfg.n_freq)
        ln_ref, periods = _period_grid(wave, cfg.n_freq)
        net = TransformerPayneNet(L, **arch, ln_ref=ln_ref, periods=periods)
        with torch.no_grad():   # start from the mean flux: the blocks then learn the label dependence
            net.head.bias.fill_(float(flux[usable].mean()) if usable.any() else 1.0)
    net = net.to(dev)
    for p in net.parameters():
        p.requires_grad_(True)

    tr, va = split(n, cfg.validation_fraction, cfg.seed)
    T = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
    X = T(x.astype(np.float32))
    Y = T(flux)
    W = T(usable.astype(np.float32))
    with torch.no_grad():
        E = net.embed(wave)                                              # (n_pix, 2F)
    blocks = T(_blocks(n_pix, cfg.pixels_per_sample, cfg.seed))          # (n_blocks, P)
    nb = len(blocks)
    star_of = T(np.repeat(tr, nb))                                       # samples: (train star, pixel block)
    block_of = T(np.tile(np.arange(nb), len(tr)))

    def batch_loss(m, star, block):
        pix = blocks[block]                                              # (B, P)
        pred = m(X[star], E[pix])                                        # (B, P)
        w = W[star[:, None], pix]
        return ((pred - Y[star[:, None], pix]).abs() * w).sum() / w.sum().clamp_min(1)

    vidx = T(va)

    def validate(m):
        acc = PixelErrors(n_pix, dev)
        for lo in range(0, len(vidx), 64):
            s = vidx[lo:lo + 64]
            tok = m.tokens(X[s])
            for plo in range(0, n_pix, 2048):
                sl = slice(plo, plo + 2048)
                acc.add((m.decode(tok, E[sl]) - Y[s, sl]) * W[s, sl], W[s, sl], sl)
        return acc.result()

    loop_cfg = LoopConfig.of(cfg)
    init_id = None if init is None else init.model_id
    run_meta = {"kind": "transformer-payne", "label_names": list(ts.label_names), "n_pix": int(n_pix),
                "architecture": arch, "init": init_id, "transformer_payne_config": asdict(cfg)}
    result = train_loop(net, batch_loss, (star_of, block_of), validate, loop_cfg, checkpoint_dir=out_dir,
                        resume=resume, progress=progress, desc="train transformer-payne", run_meta=run_meta)
    with torch.no_grad():
        mae, ex = validate(net)
    mae_pp = np.asarray(ex["mae_per_pixel"])
    mse_pp = np.asarray(ex["mse_per_pixel"])
    net = net.cpu().float().eval()
    n_par = int(sum(p.numel() for p in net.parameters()))
    lo_w, hi_w = float(wave.min()), float(wave.max())
    if init is not None:   # the network still knows the wavelengths it was first trained on
        lo0, hi0 = init.meta.get("training_wavelength_range_aa", [lo_w, hi_w])
        lo_w, hi_w = min(lo_w, lo0), max(hi_w, hi0)
    train_meta = {"method": "transformer-payne", "n_train": int(len(tr)), "n_validation": int(len(va)),
                  "validation_mae": mae, "validation_mae_p50_p90_p99": np.nanpercentile(mae_pp, [50, 90, 99]).tolist(),
                  "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "seconds": result.seconds,
                  "n_parameters": n_par, "init": init_id, "config": asdict(cfg),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **ts.notes}
    model = TransformerPayne(net, label_names=ts.label_names, x_min=x_min, x_max=x_max, wavelength_aa=wave,
                             wavelength_medium=ts.wavelength_medium, resolution=ts.resolution, training_labels=labels,
                             model_variance=mse_pp,
                             meta={**(meta or {}), "training": train_meta,
                                   "training_wavelength_range_aa": [lo_w, hi_w]})
    report = TransformerPayneTrainReport(n_train=len(tr), n_validation=len(va), n_pix=n_pix, n_labels=L,
                                         architecture=arch, n_parameters=n_par, validation_mae=mae,
                                         mae_per_pixel=mae_pp, loop=result, device=str(dev), init=init_id,
                                         timings={"total_s": time.perf_counter() - t0})
    return model, report
