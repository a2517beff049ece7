"""The per-partition stage of a fit run: pure, no Dask, testable on its own.

``fit_partition(table, model, config, grid)`` takes rows of the spectra store and returns the
catalog rows for them, one per input row, in the same order: fitted, or flagged when the input
cannot be used. The graph builder in :mod:`.run` only maps it over partitions.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..catalog.writer import result_table
from ..config import FitConfig
from ..fit.kernel import SpectrumFitter
from ..fit.registry import make_fitter
from ..io.store import list_to_numpy
from ..models.base import Emulator


@dataclass(frozen=True)
class GridSpec:
    """What the kernel needs to know about the store's pixels (from ``store.json``)."""

    wavelength_aa: tuple[float, ...]
    wavelength_medium: str = "vacuum"
    resolution: float | None = None
    segments: tuple[tuple[float, float], ...] | None = None

    @classmethod
    def from_store_meta(cls, meta: dict[str, Any]) -> "GridSpec":
        seg = meta.get("segments")
        return cls(tuple(float(x) for x in meta["wavelength_aa"]), meta.get("wavelength_medium", "vacuum"),
                   meta.get("resolution"), tuple(tuple(s) for s in seg) if seg else None)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.wavelength_aa, self.wavelength_medium, self.resolution,
                                          self.segments]).encode()).hexdigest()[:16]


_FITTERS: "OrderedDict[tuple, SpectrumFitter]" = OrderedDict()


def get_fitter(model: Emulator, grid: GridSpec, config: FitConfig, device: str = "cpu") -> SpectrumFitter:
    """A SpectrumFitter for (model, grid, config, device), built once per process and reused."""
    key = (id(model), grid.key, config, str(device))
    fitter = _FITTERS.get(key)
    if fitter is None:
        fitter = make_fitter(model, np.asarray(grid.wavelength_aa), wavelength_medium=grid.wavelength_medium,
                             resolution=grid.resolution, segments=grid.segments, config=config, device=device)
        _FITTERS[key] = fitter
        while len(_FITTERS) > 4:
            _FITTERS.popitem(last=False)
    return fitter


def fit_partition(table: pa.Table, model: Emulator, config: FitConfig, grid: GridSpec,
                  device: str = "cpu") -> pa.Table:
    """Catalog rows (one per row of ``table``, same order) for a table of store rows."""
    fitter = get_fitter(model, grid, config, device)
    n_pix = len(grid.wavelength_aa)
    flux = list_to_numpy(table.column("flux"), n_pix)
    ivar = list_to_numpy(table.column("ivar"), n_pix)
    mask = list_to_numpy(table.column("mask"), n_pix, np.bool_) if "mask" in table.column_names else None
    result = fitter.fit(flux, ivar, mask)
    return result_table(table, result, model.model_id)


def timed_fit_partition(table, model, config, grid, device="cpu") -> tuple[pa.Table, float]:
    t0 = time.perf_counter()
    out = fit_partition(table, model, config, grid, device)
    return out, time.perf_counter() - t0
