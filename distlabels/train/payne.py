"""Training The Payne's emulator on a grid of spectra (Ting et al. 2019).

An MLP, labels scaled to [-0.5, 0.5] over the grid's label box, hidden layers with LeakyReLU
(slope 0.01, as The Payne and bossbrain), a linear output layer of one value per pixel; L1 loss
(The Payne's) or inverse-variance-weighted L2; RAdam or Adam; a held-out validation split whose
mean absolute error (normalised flux) picks the best epoch and stops the run. The result is a
``payne-mlp`` model (:class:`distlabels.models.PayneMLP`) whose per-pixel ``model_variance`` is
the validation mean squared emulation error, so the fit kernel knows how far to trust each pixel.

The loop itself is :func:`distlabels.train.loop.train_loop`, reusable by other network kinds.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..config import PayneTrainConfig
from ..errors import DistlabelsError
from ..models.payne import PayneMLP
from .data import TrainingSet
from .loop import LoopConfig, LoopResult, PixelErrors, train_loop


class PayneNet(torch.nn.Module):
    """The trainable network (torch layers; exported to PayneMLP's weight lists afterwards)."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], n_out: int, activation: str = "leaky_relu",
                 negative_slope: float = 0.01):
        super().__init__()
        sizes = [n_in, *hidden, n_out]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation, self.negative_slope = activation, negative_slope

    def act(self, z):
        if self.activation == "leaky_relu":
            return torch.nn.functional.leaky_relu(z, self.negative_slope)
        if self.activation == "sigmoid":
            return torch.sigmoid(z)
        if self.activation == "tanh":
            return torch.tanh(z)
        raise DistlabelsError(f"unknown activation {self.activation!r}.")

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


@dataclass
class PayneTrainReport:
    n_train: int
    n_validation: int
    n_pix: int
    n_labels: int
    hidden: tuple[int, ...]
    validation_mae: float                  # overall, normalised flux
    mae_per_pixel: np.ndarray              # (n_pix,)
    loop: LoopResult
    device: str
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        p = np.nanpercentile(self.mae_per_pixel, [50, 90, 99])
        return (f"{self.n_train} train / {self.n_validation} validation spectra x {self.n_pix} px, {self.n_labels} labels, "
                f"hidden {list(self.hidden)}, {self.loop.epochs_run} epochs (best {self.loop.best_epoch}"
                f"{', stopped early' if self.loop.stopped_early else ''}) in {self.loop.seconds:.1f} s on {self.device}; "
                f"validation MAE {self.validation_mae:.3e} (per pixel: median {p[0]:.2e}, 90% {p[1]:.2e}, "
                f"99% {p[2]:.2e})")


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a seeded random split, at least one star in each."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = min(max(int(round(fraction * n)), 1), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def grid_labels(ts: TrainingSet) -> np.ndarray:
    """The training set's labels (n, L) float64; refuses a grid too small to train and validate on."""
    labels = np.asarray(ts.labels, np.float64)
    if len(labels) < 10:
        raise DistlabelsError(f"{len(labels)} grid spectra are too few to train and validate a network.")
    return labels


def label_box(label_names, labels: np.ndarray):
    """Per-label (min, max) of the grid, the box scaled to [-0.5, 0.5]; refuses a label with one value."""
    x_min, x_max = labels.min(0), labels.max(0)
    const = [name for name, a, b in zip(label_names, x_min, x_max) if not b > a]
    if const:
        raise DistlabelsError(f"label(s) {', '.join(const)} take one value across the grid; drop them.")
    return x_min, x_max


def train_payne(ts: TrainingSet, config: PayneTrainConfig | None = None, *, device="cpu", out_dir=None,
                resume: bool = False, progress: bool = True, meta: dict | None = None):
    """Train a Payne MLP on grid spectra; returns (PayneMLP, PayneTrainReport).

    out_dir: where checkpoints go (``out_dir/checkpoint``); resume continues from there.
    """
    cfg = config or PayneTrainConfig()
    from ..fit.registry import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    labels = grid_labels(ts)
    n, L = labels.shape
    x_min, x_max = label_box(ts.label_names, labels)
    x = (labels - x_min) / (x_max - x_min) - 0.5
    flux = np.asarray(ts.flux, np.float32)
    ivar = np.asarray(ts.ivar, np.float32)
    usable = np.isfinite(flux) & (ivar > 0)
    n_pix = flux.shape[1]
    if cfg.loss == "l1":
        weight = usable.astype(np.float32)
    elif cfg.loss == "l2":
        # Inverse-variance weights, normalised so the loss is in units of the mean variance.
        w = np.where(usable, ivar, 0)
        weight = (w / max(float(w[usable].mean()) if usable.any() else 1.0, 1e-30)).astype(np.float32)
    else:
        raise DistlabelsError(f"unknown loss {cfg.loss!r} (l1 or l2).")
    flux = np.where(usable, flux, 1.0).astype(np.float32)
    tr, va = split(n, cfg.validation_fraction, cfg.seed)
    T = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
    xt, yt, wt = T(x[tr].astype(np.float32)), T(flux[tr]), T(weight[tr])
    xv, yv, mv = T(x[va].astype(np.float32)), T(flux[va]), T(usable[va])
    torch.manual_seed(cfg.seed)
    net = PayneNet(L, tuple(cfg.hidden), n_pix, cfg.activation, cfg.negative_slope).to(dev)

    if cfg.loss == "l1":
        def batch_loss(m, xb, yb, wb):
            return ((m(xb) - yb).abs() * wb).sum() / wb.sum().clamp_min(1)
    else:
        def batch_loss(m, xb, yb, wb):
            return ((m(xb) - yb) ** 2 * wb).sum() / (wb > 0).sum().clamp_min(1)

    def validate(m):
        acc = PixelErrors(n_pix, dev)
        for lo in range(0, len(xv), 4096):
            mb = mv[lo:lo + 4096]
            acc.add((m(xv[lo:lo + 4096]) - yv[lo:lo + 4096]) * mb, mb)
        return acc.result()

    loop_cfg = LoopConfig.of(cfg)
    run_meta = {"kind": "payne-mlp", "label_names": list(ts.label_names), "n_pix": int(n_pix),
                "hidden": list(cfg.hidden), "payne_config": asdict(cfg)}
    result = train_loop(net, batch_loss, (xt, yt, wt), validate, loop_cfg, checkpoint_dir=out_dir, resume=resume,
                        progress=progress, desc="train payne", run_meta=run_meta)
    with torch.no_grad():
        mae, ex = validate(net)
    mae_pp = np.asarray(ex["mae_per_pixel"])
    mse_pp = np.asarray(ex["mse_per_pixel"])
    weights = [layer.weight.detach().cpu().float() for layer in net.layers]
    biases = [layer.bias.detach().cpu().float() for layer in net.layers]
    model = PayneMLP(weights, biases, activation=cfg.activation, negative_slope=cfg.negative_slope,
                     label_names=ts.label_names, x_min=x_min, x_max=x_max, wavelength_aa=ts.wavelength_aa,
                     wavelength_medium=ts.wavelength_medium, resolution=ts.resolution, training_labels=labels,
                     model_variance=mse_pp,
                     meta={**(meta or {}), "training": {
                         "method": "payne-mlp", "n_train": int(len(tr)), "n_validation": int(len(va)),
                         "validation_mae": mae, "validation_mae_p50_p90_p99":
                             np.nanpercentile(mae_pp, [50, 90, 99]).tolist(),
                         "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                         "seconds": result.seconds, "config": asdict(cfg),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **ts.notes}})
    report = PayneTrainReport(n_train=len(tr), n_validation=len(va), n_pix=n_pix, n_labels=L, hidden=tuple(cfg.hidden),
                              validation_mae=mae, mae_per_pixel=mae_pp, loop=result, device=str(dev),
                              timings={"total_s": time.perf_counter() - t0})
    return model, report


def write_validation(out_dir, report: PayneTrainReport, wavelength_aa) -> list:
    """``validation.json`` (overall and per-pixel MAE) and ``validation_mae.png`` next to the model."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    (out / "validation.json").write_text(json.dumps({
        "validation_mae": report.validation_mae, "n_validation": report.n_validation,
        "wavelength_aa": np.asarray(wavelength_aa).tolist(), "mae_per_pixel": report.mae_per_pixel.tolist(),
        "history": report.loop.history}, indent=None))
    written = [out / "validation.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6))
        a1.plot(wavelength_aa, report.mae_per_pixel, lw=0.5)
        a1.set_xlabel("wavelength [A]")
        a1.set_ylabel("validation MAE")
        a1.set_yscale("log")
        h = report.loop.history
        a2.plot([r["epoch"] for r in h], [r["val"] for r in h], label="validation MAE")
        a2.plot([r["epoch"] for r in h], [r["train_loss"] for r in h], label="training loss", alpha=0.6)
        a2.set_yscale("log")
        a2.set_xlabel("epoch")
        a2.legend()
        fig.tight_layout()
        fig.savefig(out / "validation_mae.png", dpi=110)
        plt.close(fig)
        written.append(out / "validation_mae.png")
    except Exception:  # a plot must never fail a finished training
        pass
    return written
