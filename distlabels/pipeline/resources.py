"""How many stars a GPU batch may hold: pure arithmetic, no torch, no Dask (unit-tested).

A Levenberg-Marquardt step on a batch holds, per star, the emulator evaluated on the working grid
with its Jacobian, the model on the observed pixels with the Jacobian of every parameter, the data
and weights, and the float64 normal equations. The kernel's working grid oversamples the observed
pixels ``oversample`` times (plus a margin for the RV range), so every size follows from the data's
pixel count, the number of labels and continuum coefficients, and the network's hidden widths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Temporaries (interpolation, masked copies, the start search) on top of the arrays counted below.
# Calibrated on an H100 (torch's peak allocation over whole fits, pre-normalised and with the
# continuum, 8,192-49,152 LAMOST-like stars, 16,384 on the model's grid): 1.5 puts the estimate
# 1.1-1.7x above every measured peak (2.0 had it 1.5-2.2x above): batches a third larger.
OVERHEAD_FACTOR = 1.5
WORK_MARGIN = 1.1   # working grid = oversample * n_pix * margin (room for +-v_max)


@dataclass(frozen=True)
class BatchShape:
    """What sets the memory of one star in a batch."""

    n_pix: int                       # observed pixels
    n_labels: int
    n_cont: int                      # continuum coefficients (all segments)
    hidden: tuple[int, ...] = ()     # hidden layer widths of the emulator
    oversample: int = 2
    dtype_bytes: int = 4             # network precision (float32)

    @property
    def n_par(self) -> int:
        return self.n_labels + 1 + self.n_cont

    @property
    def n_work(self) -> int:
        return int(math.ceil(self.oversample * self.n_pix * WORK_MARGIN))


def bytes_per_star(shape: BatchShape) -> int:
    """Estimated device bytes one star occupies during an LM step (with OVERHEAD_FACTOR)."""
    b = shape.dtype_bytes
    network = sum(shape.hidden) * (shape.n_labels + 1) * b              # activations + forward Jacobian
    working = shape.n_work * (shape.n_labels + 1) * b                   # flux and d flux / d labels
    observed = shape.n_pix * (shape.n_par + 6) * b                      # model, Jacobian, data, ivar, mask...
    normal = 3 * shape.n_par * shape.n_par * 8                          # J^T W J, its inverse, a copy (float64)
    return int(OVERHEAD_FACTOR * (network + working + observed + normal))


def batch_size_for_memory(free_bytes: int, per_star_bytes: int, *, fraction: float = 0.5,
                          max_batch: int | None = None, min_batch: int = 1) -> int:
    """Stars per batch so that a batch uses at most ``fraction`` of ``free_bytes``.

    ``floor(fraction * free_bytes / per_star_bytes)``, clipped to [min_batch, max_batch]; the
    fraction leaves room for the caching allocator's fragmentation and for other processes.
    """
    if per_star_bytes <= 0:
        raise ValueError("per_star_bytes must be positive")
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    n = int(fraction * max(int(free_bytes), 0) // per_star_bytes)
    if max_batch is not None:
        n = min(n, int(max_batch))
    return max(n, int(min_batch))


__all__ = ["BatchShape", "bytes_per_star", "batch_size_for_memory"]
