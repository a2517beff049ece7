"""The catalog subcommands as a user meets them: query (FITS, --clean, cones), plot (every kind),
compact, info; one-line errors. Expectations from DuckDB and astropy, not distlabels' reader."""
from __future__ import annotations

import json
import shutil

import duckdb
import pytest

from tests.cli.test_cli import assert_one_line_error, run


def _duck(root, where="true"):
    # count(*) FILTER, not WHERE: DuckDB 2.0's Parquet statistics pushdown drops NaN rows from
    # "WHERE isnan(x)" (the statistics leave NaN out), an aggregate filter reads every row
    return duckdb.sql(f"select count(*) filter (where {where}) from read_parquet('{root}/dataset/**/*.parquet')"
                      ).fetchall()[0][0]


def test_clean_help_states_the_defaults():
    from distlabels.catalog import CLEAN

    proc = run("query", "--help")
    text = " ".join(proc.stdout.split())
    assert f"S/N >= {CLEAN.min_snr:g}" in text and f"chi^2 <= {CLEAN.max_chi2_red:g}" in text


@pytest.mark.parametrize("args,needles", [
    (["--cone", "10", "abc", "1"], ["three numbers"]),
    (["--cone", "10", "95", "1"], ["declination 95"]),
    (["--cone", "10", "5", "3600"], ["not arcsec"]),
    (["--where", "teff >"], ["could not parse"]),
    (["--columns", "source_id,tef"], ["'tef'", "did you mean 'teff'"]),
    (["--format", "fits"], ["--out"]),
])
def test_query_errors_are_one_line(fitted_catalog, args, needles):
    assert_one_line_error(run("query", fitted_catalog[0], *args), *needles)


def test_query_fits_and_clean(fitted_catalog, tmp_path):
    from astropy.table import Table

    root = fitted_catalog[0]
    out = tmp_path / "clean.fits"
    proc = run("query", root, "--clean", "--columns", "source_id,teff,logg,flags,snr,chi2_red", "--format", "fits",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    t = Table.read(out)
    n_expected = _duck(root, "flags = 0 and snr >= 20 and chi2_red <= 3")
    assert len(t) == n_expected > 0 and t["teff"].unit == "K"
    assert (t["flags"] == 0).all() and (t["snr"] >= 20).all()


def test_plot_every_kind(fitted_catalog, tmp_path):
    root = fitted_catalog[0]
    sid = duckdb.sql(f"select source_id from read_parquet('{root}/dataset/**/*.parquet') where flags = 0 "
                     "order by source_id limit 1").fetchall()[0][0]
    for kind, extra in (("kiel", ["--clean"]), ("abundances", ["--where", "teff < 4800"]),
                        ("recovery", ["--labels", "all"]), ("residuals", ["--source-id", sid, "--wave-range", "5000,5600"])):
        out = tmp_path / f"{kind}.png"
        proc = run("plot", root, kind, "--out", out, *extra)
        assert proc.returncode == 0, (kind, proc.stderr)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert_one_line_error(run("plot", root, "residuals", "--out", tmp_path / "r.png"), "--source-id")
    assert_one_line_error(run("plot", root, "residuals", "--out", tmp_path / "r.png", "--source-id", "nobody"),
                          "not in the catalog")
    assert_one_line_error(run("plot", root, "kiel", "--out", tmp_path / "k.png", "--where", "logq < 1"), "'logq'")


def test_compact_max_rows_help_and_errors(fitted_catalog, tmp_path):
    from distlabels.catalog.partitioning import DEFAULT_MAX_ROWS

    text = " ".join(run("compact", "--help").stdout.split())
    assert f"(default {DEFAULT_MAX_ROWS}:" in text and "cone search reads more rows" in text
    root = tmp_path / "cat"
    shutil.copytree(fitted_catalog[0], root)
    assert_one_line_error(run("compact", root, "--max-rows", "-5"), "--max-rows")
    proc = run("compact", root, "--max-rows", "1000000", "--no-progress")  # everything fits in one order-0 pixel each
    assert proc.returncode == 0, proc.stderr
    assert "partitions" in proc.stdout and _duck(root) == _duck(fitted_catalog[0])


def test_compact_and_info(fitted_catalog, tmp_path):
    root = tmp_path / "cat"
    shutil.copytree(fitted_catalog[0], root)
    n = _duck(root)
    proc = run("info", root, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["rows"]["total"] == n and info["rows"]["not_fitted"] == _duck(root, "isnan(teff)")
    assert info["provenance"]["model_sha256"] and info["provenance"]["input_store"]
    bits = {f["name"]: f["count"] for f in info["flags"]}
    assert bits.get("BAD_INPUT") == _duck(root, "flags & 512 != 0")
    teff = next(r for r in info["labels"] if r["label"] == "teff")
    lo, hi = duckdb.sql(f"select min(teff), max(teff) from read_parquet('{root}/dataset/**/*.parquet') "
                        "where not isnan(teff)").fetchall()[0]
    assert teff["min"] == pytest.approx(lo) and teff["max"] == pytest.approx(hi)
    proc = run("compact", root, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"{n:,} rows" in proc.stdout
    assert _duck(root) == n
    text = run("info", root).stdout
    assert "compact;" in text and "HATS files up to date" in text and "BAD_INPUT" in text
