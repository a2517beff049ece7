"""Which fitter fits which emulator kind.

Most kinds go through the general kernel (:class:`distlabels.fit.kernel.SpectrumFitter`: labels,
RV and a multiplicative continuum by Levenberg-Marquardt). A kind whose test step is different
registers its own fitter, with the same ``fit(flux, ivar, mask) -> FitResult`` API::

    @register_fitter("cannon")
    class CannonFitter: ...

and :func:`make_fitter` picks it from ``model.kind``. The pipeline builds every fitter through here.
"""
from __future__ import annotations

import importlib

import torch

_FITTERS: dict[str, type] = {}
# Modules that register fitters for built-in kinds (imported on first use, not at import time,
# so that this module stays importable from anywhere in the fit layer).
BUILTIN_FITTER_MODULES = ("distlabels.fit.cannon", "distlabels.fit.payne_perpixel")
_loaded = False


def register_fitter(kind: str):
    """Class decorator: use this fitter for models whose ``kind`` is ``kind``."""

    def deco(cls):
        if kind in _FITTERS and _FITTERS[kind] is not cls:
            raise ValueError(f"a fitter for kind {kind!r} is already registered")
        _FITTERS[kind] = cls
        return cls

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for mod in BUILTIN_FITTER_MODULES:
            importlib.import_module(mod)
        _loaded = True


def fitter_class(kind: str) -> type:
    """The fitter registered for ``kind``, else the general kernel."""
    _load_builtins()
    if kind in _FITTERS:
        return _FITTERS[kind]
    from .kernel import SpectrumFitter

    return SpectrumFitter


def check_fit_options(kind: str, config) -> None:
    """Refuse, in one sentence, FitConfig options the fitter of ``kind`` cannot honour.

    A fitter class lists them in ``UNSUPPORTED_OPTIONS`` (option name -> why); the general kernel
    supports every option (vsini and an extra LSF width for any emulator kind). A registered fitter
    that does fit vsini says so with ``FITS_VSINI = True`` (``tests/fit/test_hotpayne.py`` holds every
    registered kind to one or the other). Called before a run starts and by the fitters themselves,
    so an option is never silently ignored.
    """
    from ..errors import DistlabelsError

    cls = fitter_class(kind)
    for name, why in getattr(cls, "UNSUPPORTED_OPTIONS", {}).items():
        if config is not None and getattr(config, name, None):
            raise DistlabelsError(f"the {kind!r} fitter does not support {name} ({why}).")


def registered_fitters() -> dict[str, type]:
    _load_builtins()
    return dict(_FITTERS)


def make_fitter(model, wavelength_aa, *, wavelength_medium: str = "vacuum", resolution: float | None = None,
                segments=None, config=None, device="cpu"):
    """A fitter for ``model`` on the observed grid ``wavelength_aa`` (n_pix,), chosen by ``model.kind``."""
    cls = fitter_class(getattr(model, "kind", ""))
    return cls(model, wavelength_aa, wavelength_medium=wavelength_medium, resolution=resolution, segments=segments,
               config=config, device=device)


def resolve_device(device) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; anything else as torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
