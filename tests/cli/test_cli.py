"""The command line as a user meets it: --help everywhere, one-line errors, YAML configs."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest

SUBCOMMANDS = [[], ["models"], ["models", "import"], ["models", "info"], ["mock"], ["fit"], ["query"], ["plot"],
               ["demo"], ["compact"], ["info"]]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "distlabels", *map(str, args)], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env=env)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlabels: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: " ".join(s) or "top")
def test_every_subcommand_has_help(sub):
    proc = run(*sub, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: distlabels" in proc.stdout


def test_malformed_model_is_one_line_error(tmp_path, mock_store):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "model.json").write_text("{ not json")
    (bad / "weights.safetensors").write_bytes(b"\x00" * 10)
    assert_one_line_error(run("fit", "--model", bad, "--spectra", mock_store, "--out", tmp_path / "c"),
                          "model.json", "not valid JSON")
    (bad / "model.json").write_text('{"kind": "payne-mlp"}')
    assert_one_line_error(run("models", "info", bad), "safetensors")


def test_missing_store_is_one_line_error(tmp_path, bossbrain_model_dir):
    assert_one_line_error(run("fit", "--model", bossbrain_model_dir, "--spectra", tmp_path / "nowhere",
                              "--out", tmp_path / "c"), "does not exist")


def test_unknown_label_in_where_is_one_line_error(fitted_catalog):
    proc = run("query", fitted_catalog[0], "--where", "tef < 4500")
    assert_one_line_error(proc, "tef")
    assert "teff" in proc.stderr                      # suggests the close match


def test_query_csv_and_yaml_config(tmp_path, fitted_catalog, bossbrain_model_dir):
    proc = run("query", fitted_catalog[0], "--where", "logg < 1", "--columns", "source_id,logg", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["source_id", "logg"] and len(rows) > 1 and all(float(r[1]) < 1 for r in rows[1:])
    cfg = tmp_path / "mock.yaml"
    cfg.write_text("n: 12\nseed: 3\ngrid: lamost\nsnr_range: [30, 40]\n")
    proc = run("mock", "--config", cfg, "--model", bossbrain_model_dir, "--out", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 12 mock spectra" in proc.stdout
    cfg.write_text("n: 12\nbogus_option: 1\n")
    assert_one_line_error(run("mock", "--config", cfg, "--model", bossbrain_model_dir, "--out", tmp_path / "t"),
                          "bogus_option")
