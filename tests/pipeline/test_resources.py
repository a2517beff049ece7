"""GPU batch sizing: the arithmetic, checked by hand, and the shape read from a real model."""
from __future__ import annotations

import pytest

from distlabels.config import FitConfig
from distlabels.pipeline.partition import GridSpec
from distlabels.pipeline.resources import OVERHEAD_FACTOR, BatchShape, batch_size_for_memory, bytes_per_star
from distlabels.pipeline.worker import batch_shape


def test_bytes_per_star_by_hand():
    s = BatchShape(n_pix=1000, n_labels=3, n_cont=4, hidden=(10, 20), oversample=2, dtype_bytes=4)
    assert s.n_par == 8 and s.n_work == 2200
    network = 30 * 4 * 4          # sum(hidden) * (n_labels + 1) * 4 bytes
    working = 2200 * 4 * 4
    observed = 1000 * (8 + 6) * 4
    normal = 3 * 64 * 8
    assert bytes_per_star(s) == int(OVERHEAD_FACTOR * (network + working + observed + normal))


# Peak GPU memory (torch.cuda.max_memory_allocated, GiB) of whole fits of the bossbrain 22-label model
# measured on an H100 (benchmarks/RESULTS.md, "On a GPU"): (observed pixels, continuum coefficients,
# working-grid oversampling, stars per batch, GiB). The model grid is its own working grid (oversample 1).
H100_PEAKS = [(3909, 0, 2, 8192, 9.6), (3909, 0, 2, 32768, 35.8), (3909, 0, 2, 49152, 53.7),
              (3909, 8, 2, 8192, 14.4), (3909, 8, 2, 32768, 50.0), (14001, 0, 1, 16384, 65.0),
              (14001, 3, 1, 16384, 64.9)]


@pytest.mark.parametrize("n_pix,n_cont,oversample,n_star,peak_gib", H100_PEAKS)
def test_estimate_covers_measured_gpu_peaks(n_pix, n_cont, oversample, n_star, peak_gib):
    """The estimate stays above every peak measured on a GPU (a batch sized by it does not run out of
    memory), and not wastefully so (within 1.8x)."""
    shape = BatchShape(n_pix=n_pix, n_labels=22, n_cont=n_cont, hidden=(300, 300), oversample=oversample)
    measured = peak_gib * (1 << 30) / n_star
    assert 1.0 < bytes_per_star(shape) / measured < 1.8


def test_batch_size_for_memory_arithmetic():
    gib = 1 << 30
    # 80 GiB free, half of it, 1 MiB per star: 40,960 stars.
    assert batch_size_for_memory(80 * gib, 1 << 20, fraction=0.5) == 40960
    assert batch_size_for_memory(80 * gib, 1 << 20, fraction=0.5, max_batch=10000) == 10000
    assert batch_size_for_memory(3 * (1 << 20), 1 << 20, fraction=0.5) == 1           # 1.5 -> floor 1
    assert batch_size_for_memory(0, 1 << 20) == 1 and batch_size_for_memory(0, 1 << 20, min_batch=8) == 8
    with pytest.raises(ValueError):
        batch_size_for_memory(gib, 0)
    with pytest.raises(ValueError):
        batch_size_for_memory(gib, 1, fraction=1.5)


def test_batch_shape_of_the_bossbrain_model(bossbrain_model, mock_snr50):
    grid = GridSpec.from_store_meta(mock_snr50[1])
    shape = batch_shape(bossbrain_model, grid, FitConfig(continuum_degree=3))
    layers = [p for p in bossbrain_model.parameters() if p.ndim == 2]
    assert shape.n_pix == 3909 and shape.n_labels == bossbrain_model.n_labels
    assert shape.hidden == tuple(int(w.shape[0]) for w in layers[:-1]) and len(shape.hidden) >= 1
    n_seg = len(grid.segments) if grid.segments else 1
    assert shape.n_cont == 4 * n_seg and shape.dtype_bytes == 4
    # A star of this model on a LAMOST grid needs megabytes, not bytes or gigabytes.
    assert 1e5 < bytes_per_star(shape) < 1e8
