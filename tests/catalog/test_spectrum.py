"""One star's spectrum with its best-fit model, from a real fit run (bossbrain emulator, S/N 50)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distlabels.catalog.query import open_catalog
from distlabels.catalog.spectrum import residuals_plot
from distlabels.errors import DistlabelsError, QueryError, StoreError


@pytest.fixture(scope="module")
def fitted(fitted_catalog):
    cat = open_catalog(fitted_catalog[0])
    good = cat.query(where="flags == 0", columns=["source_id", "chi2_red"], limit=2)
    return cat, good.column("source_id").to_pylist()


def test_residuals_reproduce_the_catalog_fit(fitted, tmp_path) -> None:
    cat, ids = fitted
    for sid in ids:
        out, fig, star = residuals_plot(cat, sid, tmp_path / f"{sid}.png", return_fig=True)
        assert out.stat().st_size > 10_000
        # the continuum re-solved at the catalog's labels and RV gives back the fit's own chi^2 ...
        assert star.chi2_red == pytest.approx(star.row["chi2_red"], rel=2e-3)
        # ... and residuals consistent with the mock's Gaussian noise (independent of the kernel)
        pull = ((star.flux - star.model) * np.sqrt(star.ivar))[star.used]
        assert 0.85 < np.std(pull) < 1.2 and abs(np.mean(pull)) < 0.1
        assert star.used.sum() > 0.9 * len(star.flux)
        top, bottom = fig.axes[:2]
        assert "wavelength [Å]" in bottom.get_xlabel() and top.get_ylabel() and bottom.get_ylabel()
        assert sid in top.get_title() and "χ²_red" in top.get_title()
        lo, hi = top.get_xlim()
        assert lo == pytest.approx(star.wavelength_aa.min()) and hi == pytest.approx(star.wavelength_aa.max())
    _, fig, _ = residuals_plot(cat, ids[0], tmp_path / "zoom.png", wave_range=(5000, 5300), return_fig=True)
    assert fig.axes[0].get_xlim()[0] >= 5000 and fig.axes[0].get_xlim()[1] <= 5300


def test_not_fitted_star_shows_the_data_only(fitted, tmp_path) -> None:
    cat, _ = fitted
    _, fig, star = residuals_plot(cat, "bad:few-pixels", tmp_path / "bad.png", return_fig=True)
    assert star.model is None and "FEW_PIXELS" in fig.axes[0].get_title()


def test_residuals_errors(fitted, tmp_path, bossbrain_model_dir) -> None:
    cat, ids = fitted
    with pytest.raises(QueryError, match="not in the catalog"):
        residuals_plot(cat, "nobody", tmp_path / "x.png")
    with pytest.raises(StoreError, match="does not exist"):
        residuals_plot(cat, ids[0], tmp_path / "x.png", spectra=tmp_path / "nowhere")
    other = tmp_path / "model"
    shutil.copytree(bossbrain_model_dir, other)
    meta = json.loads((other / "model.json").read_text())
    meta["weights_sha256"] = "f" * 64
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DistlabelsError, match="not the one this catalog was fitted with"):
        residuals_plot(cat, ids[0], tmp_path / "x.png", model=other)
