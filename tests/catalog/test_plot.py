"""Kiel and recovery figures: valid PNG files with the axes drawn the astronomers' way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from distlabels.catalog.plot import kiel_diagram, point_style, recovery_plot, recovery_stats
from distlabels.catalog.query import open_catalog
from distlabels.errors import QueryError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(scope="module")
def table(mock_catalog) -> pa.Table:
    return open_catalog(mock_catalog.root).query()


def test_kiel_from_table(table: pa.Table, tmp_path: Path) -> None:
    out, fig = kiel_diagram(table, tmp_path / "figs" / "kiel.png", return_fig=True)
    assert out == tmp_path / "figs" / "kiel.png" and _is_png(out)
    ax = fig.axes[0]
    assert ax.xaxis_inverted() and ax.yaxis_inverted()
    assert "Teff" in ax.get_xlabel() and "log g" in ax.get_ylabel()
    cbar_ax = fig.axes[1]
    assert "[M/H]" in cbar_ax.get_ylabel()
    n_ok = int(np.sum(np.isfinite(table.column("teff").to_numpy()) & np.isfinite(table.column("logg").to_numpy())))
    assert f"N = {n_ok:,}" in ax.get_title()
    assert n_ok < table.num_rows  # failed fits (NaN) are left out of the count
    # hot on the left: the left x limit is the larger Teff
    left, right = ax.get_xlim()
    assert left > right
    assert not list(tmp_path.glob("figs/.*"))  # no temporary file left behind


def test_kiel_from_catalog_without_colour(mock_catalog, tmp_path: Path) -> None:
    out = kiel_diagram(open_catalog(mock_catalog.root), tmp_path / "k.png", color=None, title="Mock")
    assert isinstance(out, Path) and _is_png(out)


def test_kiel_missing_column(table: pa.Table, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="'vmic'"):
        kiel_diagram(table.drop_columns(["mh"]), tmp_path / "k.png", color="vmic")
    assert not (tmp_path / "k.png").exists()


def test_kiel_empty_and_tiny_tables(tmp_path: Path) -> None:
    empty = pa.table({"teff": pa.array([], pa.float32()), "logg": pa.array([], pa.float32()),
                      "mh": pa.array([], pa.float32())})
    assert _is_png(kiel_diagram(empty, tmp_path / "e.png"))
    one = pa.table({"teff": [5000.0], "logg": [4.0], "mh": [0.0]})
    assert _is_png(kiel_diagram(one, tmp_path / "one.png"))


def test_point_style_scales_with_count() -> None:
    sizes = [point_style(n)[0] for n in (100, 10_000, 1_000_000)]
    alphas = [point_style(n)[1] for n in (100, 10_000, 1_000_000)]
    assert sizes[0] > sizes[1] > sizes[2] > 0
    assert alphas[0] >= alphas[1] >= alphas[2] > 0
    assert 1 <= sizes[0] <= 10 and sizes[2] < 0.5


def test_recovery_stats_match_numpy(table: pa.Table) -> None:
    stats = recovery_stats(table, ("teff", "logg"))
    fit, true = table.column("teff").to_numpy(), table.column("true_teff").to_numpy()
    ok = np.isfinite(fit)
    d = fit[ok].astype(np.float64) - true[ok].astype(np.float64)
    assert stats["teff"]["n"] == ok.sum()
    assert stats["teff"]["bias"] == pytest.approx(np.median(d))
    assert stats["teff"]["scatter"] == pytest.approx(1.4826 * np.median(np.abs(d - np.median(d))))
    # the mock adds a +0.1 sigma offset and 1 sigma noise (sigma_teff = 50 K)
    assert stats["teff"]["bias"] == pytest.approx(5.0, abs=5.0)
    assert stats["teff"]["scatter"] == pytest.approx(50.0, rel=0.1)


def test_recovery_plot(table: pa.Table, tmp_path: Path) -> None:
    out, fig = recovery_plot(table, tmp_path / "rec.png", labels=("teff", "logg", "mh"), return_fig=True)
    assert _is_png(out)
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 3
    assert "Teff" in panels[0].get_xlabel() and "bias" in panels[0].texts[0].get_text()
    assert "scatter" in panels[1].texts[0].get_text()


def test_recovery_plot_needs_truth(table: pa.Table, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="true_teff"):
        recovery_plot(table.drop_columns(["true_teff"]), tmp_path / "r.png")
