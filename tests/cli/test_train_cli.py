"""``distlabels train``: help, one-line errors, and a Cannon trained from the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distlabels.models import load


def run(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "distlabels", *map(str, args)], capture_output=True, text=True,
                          timeout=240, env=env)


def main(capsys, *args):
    """The CLI in this process (the entry point's own error handling, without a new interpreter)."""
    from distlabels.cli.main import main as cli_main

    capsys.readouterr()
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlabels: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("sub", [["train"], ["train", "cannon"], ["train", "payne"]], ids=" ".join)
def test_help(sub):
    proc = run(*sub, "--help")
    assert proc.returncode == 0 and "usage: distlabels train" in proc.stdout


def test_user_errors_are_one_line(tmp_path, cannon_mock_stores, capsys):
    run = lambda *a: main(capsys, *a)  # noqa: E731
    assert_one_line_error(run("train", "cannon", "--spectra", tmp_path / "nope", "--labels", "teff", "--out",
                              tmp_path / "m"), "does not exist")
    assert_one_line_error(run("train", "cannon", "--spectra", cannon_mock_stores["train"], "--labels", "teff,foo",
                              "--out", tmp_path / "m"), "no label column 'foo'")
    assert_one_line_error(run("train", "payne", "--grid", cannon_mock_stores["train"], "--labels", "teff",
                              "--hidden", "0", "--out", tmp_path / "m"), "--hidden")
    assert_one_line_error(run("train", "payne", "--grid", cannon_mock_stores["train"], "--labels", "teff",
                              "--resume", "--out", tmp_path / "fresh"), "--resume")


def test_train_cannon_command_writes_a_loadable_model(tmp_path, bossbrain_model_dir, capsys):
    run = lambda *a: main(capsys, *a)  # noqa: E731
    store = tmp_path / "store"
    assert run("mock", "--model", bossbrain_model_dir, "--n", 60, "--seed", 3, "--out", store).returncode == 0
    out = tmp_path / "cannon"
    proc = run("train", "cannon", "--spectra", store, "--labels", "teff,logg,mh", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "cannon" in proc.stdout and "continuum pixels" in proc.stdout
    m = load(out)
    assert m.kind == "cannon" and m.label_names == ("teff", "logg", "mh")
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"]["normalisation"]["method"] == "chebyshev-continuum-pixels"
    assert meta["training"]["rv_column"] == "true_rv"
    # A second run into the same directory is refused, not silently overwritten.
    assert_one_line_error(run("train", "cannon", "--spectra", store, "--labels", "teff", "--out", out),
                          "already exists")
