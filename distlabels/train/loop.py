"""A generic, resumable training loop for torch emulators (The Payne now; TransformerPayne and
DD-Payne reuse it with their own module and loss).

The caller gives a module, a ``batch_loss(module, *batch) -> scalar`` over one minibatch of the
training tensors, and a ``validate(module) -> (score, extras)`` (lower is better). The loop runs
Adam or RAdam with minibatches drawn by a seeded generator, halves the learning rate after
``lr_patience`` epochs without a better validation score, stops after ``patience`` such epochs,
and always ends with the best weights loaded (early stopping keeps the best, not the last).

Checkpoints are ``checkpoint/state.safetensors`` (current and best weights, optimizer moments,
the shuffling generator's state) + ``checkpoint/state.json`` (epoch, scores, learning rate,
history, config): never a pickle. ``resume=True`` continues a run exactly where its last
checkpoint left it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import paths
from ..errors import DistlabelsError

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"


@dataclass(frozen=True)
class LoopConfig:
    optimizer: str = "radam"            # radam | adam
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 2000
    patience: int = 200
    lr_patience: int = 40
    min_learning_rate: float = 1e-5
    checkpoint_every: int = 20
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> "LoopConfig":
        """The loop settings of a training config that carries fields of the same names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class PixelErrors:
    """Per-pixel absolute and squared validation errors, accumulated over batches of spectra."""

    def __init__(self, n_pix: int, device):
        self.err, self.sq, self.cnt = (torch.zeros(n_pix, dtype=torch.float64, device=device) for _ in range(3))

    def add(self, diff: torch.Tensor, weight: torch.Tensor, pixels=slice(None)):
        """diff: (n, p) model - data, already zero where weight is; weight: (n, p) 0/1; pixels: their columns."""
        d = diff.double()
        self.err[pixels] += d.abs().sum(0)
        self.sq[pixels] += (d * d).sum(0)
        self.cnt[pixels] += weight.sum(0)

    def result(self):
        """(MAE over all pixels, {"mae_per_pixel", "mse_per_pixel"}) as the training loop's validate returns."""
        c = self.cnt.clamp_min(1)
        mae = float(self.err.sum() / self.cnt.sum().clamp_min(1))
        return mae, {"mae_per_pixel": (self.err / c).tolist(), "mse_per_pixel": (self.sq / c).tolist()}


@dataclass
class LoopResult:
    best_score: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def make_optimizer(params, cfg: LoopConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise DistlabelsError(f"unknown optimizer {cfg.optimizer!r} (radam or adam).")


# ------------------------------------------------------------------------------ checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors + JSON-able scalars (param groups, per-parameter steps)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, module: torch.nn.Module, best_state: dict[str, torch.Tensor],
                    opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict[str, Any]) -> None:
    """Write the resumable state atomically (temporary names, then rename)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    ot, om = _optimizer_tensors(opt)
    tensors.update(ot)
    tensors["generator"] = gen.get_state().clone()
    tpath, mpath = directory / STATE_TENSORS, directory / STATE_META
    tmp = paths.temp_path(tpath)
    save_file(tensors, str(tmp))
    os.replace(tmp, tpath)
    tmp = paths.temp_path(mpath)
    tmp.write_text(json.dumps({**meta, "optimizer": om}, indent=1, default=float))
    os.replace(tmp, mpath)


def load_checkpoint(directory: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator):
    """Restore module, optimizer and generator; returns (meta dict, best_state)."""
    from safetensors.torch import load_file

    tpath, mpath = directory / STATE_TENSORS, directory / STATE_META
    if not (tpath.is_file() and mpath.is_file()):
        raise DistlabelsError(f"--resume: no checkpoint in {directory} (expected {STATE_TENSORS} and {STATE_META}).")
    try:
        meta = json.loads(mpath.read_text())
        tensors = load_file(str(tpath))
    except Exception as e:  # a torn or foreign file: say so in one sentence
        raise DistlabelsError(f"--resume: checkpoint in {directory} is unreadable ({e.__class__.__name__}).") from None
    dev = next(module.parameters()).device
    try:
        module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError:
        raise DistlabelsError(f"--resume: the checkpoint in {directory} is for a network of another shape; "
                              "use the same --hidden and labels, or a fresh --out.") from None
    best = {k[5:]: v.to(dev) for k, v in tensors.items() if k.startswith("best.")}
    _load_optimizer(opt, {k: v.to(dev) for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"])
    gen.set_state(tensors["generator"])
    return meta, best


# ------------------------------------------------------------------------------ the loop
def train_loop(module: torch.nn.Module, batch_loss: Callable[..., torch.Tensor], train_tensors: tuple,
               validate: Callable[[torch.nn.Module], tuple[float, dict]], cfg: LoopConfig, *,
               checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
               desc: str = "train", run_meta: dict | None = None) -> LoopResult:
    """Train ``module`` in place (ends with its best weights); see the module docstring.

    train_tensors: tensors sharing their first dimension (the samples), already on the module's
    device; each minibatch is ``tuple(t[idx] for t in train_tensors)``.
    """
    n = len(train_tensors[0])
    if n == 0:
        raise DistlabelsError("no training samples.")
    dev = next(module.parameters()).device
    opt = make_optimizer(module.parameters(), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    ck = Path(checkpoint_dir) / CHECKPOINT_DIR if checkpoint_dir is not None else None
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    best_score, best_epoch, since_best, since_lr, epoch0 = float("inf"), -1, 0, 0, 0
    history: list[dict[str, float]] = []
    extras: dict = {}
    t_before = 0.0
    if resume and ck is not None:
        meta, best_state = load_checkpoint(ck, module, opt, gen)
        best_score, best_epoch = meta["best_score"], meta["best_epoch"]
        since_best, since_lr, epoch0 = meta["since_best"], meta["since_lr"], meta["epoch"]
        history, t_before = meta.get("history", []), meta.get("seconds", 0.0)
        extras = meta.get("extras", {})
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=epoch0, unit="epoch", desc=desc)

    def checkpoint(epoch):
        if ck is None:
            return
        save_checkpoint(ck, module, best_state, opt, gen, {
            "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "since_best": since_best,
            "since_lr": since_lr, "history": history, "seconds": t_before + time.perf_counter() - t0,
            "config": asdict(cfg), "extras": extras, **(run_meta or {})})

    stopped = False
    epoch = epoch0
    bs = max(int(cfg.batch_size), 1)
    for epoch in range(epoch0, cfg.epochs):
        module.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        total, count = 0.0, 0
        for lo in range(0, n, bs):
            idx = perm[lo:lo + bs]
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(module, *(t[idx] for t in train_tensors))
            if not torch.isfinite(loss):
                raise DistlabelsError(f"training diverged (loss {float(loss)}) at epoch {epoch}; "
                                      "lower --learning-rate.")
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        module.eval()
        with torch.no_grad():
            score, ex = validate(module)
        lr = opt.param_groups[0]["lr"]
        history.append({"epoch": epoch + 1, "train_loss": total / count, "val": float(score), "lr": lr})
        if score < best_score:
            best_score, best_epoch, since_best, since_lr = float(score), epoch + 1, 0, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            extras = ex
        else:
            since_best += 1
            since_lr += 1
            if since_lr >= cfg.lr_patience and lr > cfg.min_learning_rate:
                for g in opt.param_groups:
                    g["lr"] = max(g["lr"] * 0.5, cfg.min_learning_rate)
                since_lr = 0
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.3g}", val=f"{score:.3g}", best=f"{best_score:.3g}", lr=f"{lr:.1e}")
        if (epoch + 1) % max(cfg.checkpoint_every, 1) == 0:
            checkpoint(epoch + 1)
        if since_best >= cfg.patience:
            stopped = True
            break
    epochs_run = epoch + 1 if cfg.epochs > epoch0 else epoch0
    checkpoint(epochs_run)
    if bar:
        bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return LoopResult(best_score=best_score, best_epoch=best_epoch, epochs_run=epochs_run, stopped_early=stopped,
                      seconds=t_before + time.perf_counter() - t0, history=history, extras=extras)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
