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


# --- abundance planes, dense catalogs ----------------------------------------------------------
def test_abundance_planes(mock_catalog, table: pa.Table, tmp_path: Path) -> None:
    from distlabels.catalog.plot import abundance_planes

    out, fig = abundance_planes(open_catalog(mock_catalog.root), tmp_path / "ab.png", return_fig=True)
    assert _is_png(out)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in panels] == ["[C/M] [dex]"]  # the mock's only abundance label
    ax = panels[0]
    assert ax.get_xlabel() == "[M/H] [dex]"
    cm = table.column("cm").to_numpy()
    lo, hi = ax.get_ylim()
    p1, p99 = np.nanpercentile(cm, [1, 99])
    assert lo < p1 and hi > p99 and hi - lo < 2 * (np.nanmax(cm) - np.nanmin(cm))  # data-driven range
    n_ok = int(np.sum(np.isfinite(cm) & np.isfinite(table.column("mh").to_numpy())))
    assert any(f"N = {n_ok:,}" in t.get_text() for t in ax.texts)
    with pytest.raises(QueryError, match="no abundance labels"):
        abundance_planes(table.select(["teff", "teff_err", "mh", "mh_err"]), tmp_path / "x.png")


def _dense_table(n: int) -> pa.Table:
    rng = np.random.default_rng(3)
    teff = rng.normal(5000, 500, n)
    mh = rng.normal(-0.3, 0.3, n)
    return pa.table({"teff": teff, "logg": rng.uniform(0.5, 4.5, n), "mh": mh, "mgm": -0.3 * mh + rng.normal(0, .05, n),
                     "cam": rng.normal(0, .1, n), "true_teff": teff + rng.normal(0, 40, n),
                     "true_logg": rng.uniform(0.5, 4.5, n), "true_mh": mh})


def test_dense_catalogs_use_hexbins(tmp_path: Path) -> None:
    from matplotlib.collections import PolyCollection

    from distlabels.catalog.plot import DENSE_N, abundance_planes

    t = _dense_table(DENSE_N + 5_000)
    _, fig = kiel_diagram(t, tmp_path / "k.png", return_fig=True)
    ax = fig.axes[0]
    hexes = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert hexes and "median [M/H]" in fig.axes[1].get_ylabel()
    assert ax.xaxis_inverted() and ax.yaxis_inverted()
    _, fig = abundance_planes(t, tmp_path / "a.png", labels=["mgm", "cam"], return_fig=True)
    assert any("stars per bin" in a.get_ylabel() for a in fig.axes)
    counts = [c.get_array() for a in fig.axes for c in a.collections if isinstance(c, PolyCollection)]
    assert len(counts) == 2 and all(int(np.sum(c)) == len(t) for c in counts)  # every star in a bin
    assert _is_png(recovery_plot(t, tmp_path / "r.png"))


def test_recovery_grid_for_many_labels(table: pa.Table, tmp_path: Path) -> None:
    labels = ("teff", "logg", "mh", "cm", "rv")
    _, fig = recovery_plot(table, tmp_path / "rec.png", labels=labels, return_fig=True)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel()]
    assert len(panels) == 5 and panels[4].get_ylabel() == "fit - true RV [km/s]"
    assert "[K]" in panels[0].get_ylabel() and "[dex]" in panels[3].get_ylabel()


def test_plots_query_a_catalog_with_where_and_clean(mock_catalog, tmp_path: Path) -> None:
    cat = open_catalog(mock_catalog.root)
    n = cat.query(where="teff > 6000", clean=True, columns=["teff"]).num_rows
    _, fig = kiel_diagram(cat, tmp_path / "k.png", where="teff > 6000", clean=True, return_fig=True)
    assert f"N = {n:,}" in fig.axes[0].get_title()
    assert min(fig.axes[0].get_xlim()) >= 6000 - 0.1 * 2000
    with pytest.raises(QueryError, match="apply to a Catalog"):
        kiel_diagram(cat.query(), tmp_path / "x.png", clean=True)
