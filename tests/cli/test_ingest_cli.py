"""`distlabels ingest` as a user meets it: --help, one-line errors for inputs it cannot take."""
from __future__ import annotations

import numpy as np
import pytest

from distlabels.cli.main import main
from tests.cli.test_cli import run
from tests.io import fits_factory as ff


def test_ingest_help_lists_inputs_and_selection():
    proc = run("ingest", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: distlabels ingest" in proc.stdout and "--select" in proc.stdout and "is_star" in proc.stdout


@pytest.fixture()
def mixed(tmp_path):
    ff.lamost_set(tmp_path / "in", n=3)
    for k in range(3):
        ff.write_boss(tmp_path / "in" / f"spec-0001-50000-000{k}.fits", plate=1, mjd=50000, fiber=k, ra=1.0, dec=1.0,
                      flux=np.ones(50, np.float32), ivar=np.ones(50, np.float32))
    return tmp_path


@pytest.mark.parametrize("args, needles", [
    (["{in}"], ["mix files of several surveys", "lamost", "boss"]),
    (["{tmp}/nowhere"], ["does not exist"]),
    (["{in}", "--survey", "lamost", "--select", "snr > 10 and clas == 'X'"], ["--select", "clas"]),
    (["{in}", "--survey", "desi"], ["none of the", "desi"]),
], ids=["mixed", "missing", "bad-select", "wrong-survey"])
def test_inputs_it_cannot_take_are_one_line_errors(mixed, capsys, args, needles):
    argv = ["ingest"] + [a.format(tmp=mixed, **{"in": mixed / "in"}) for a in args] + ["--out", str(mixed / "s")]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("distlabels: error:"), err
    for n in needles:
        assert n in err[0]
    assert not (mixed / "s").exists()
