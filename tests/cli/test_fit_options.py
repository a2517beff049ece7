"""``distlabels fit`` label options: parsed into FitConfig, unknown labels refused in one line."""
from __future__ import annotations

import os
import subprocess
import sys

from distlabels.cli.main import build_parser
from distlabels.cli.production import fit_config


def _args(*argv):
    return build_parser().parse_args(["fit", "--model", "m", "--spectra", "s", "--out", "c", *argv])


def test_labels_fix_tie_masks_and_broadening_options():
    cfg = fit_config(_args("--labels", "teff,logg,mh,cm", "--fix", "om=0.1", "--tie", "mgm,sim,cam",
                           "--tie", "bam,cem=0", "--masks", "o2_a,o2_b", "--fit-vsini", "--fit-lsf", "--covariance"))
    assert cfg.labels == ("teff", "logg", "mh", "cm")
    assert dict(cfg.fix) == {"om": 0.1, "bam": 0.0, "cem": 0.0}
    assert cfg.ties == (("mgm", "sim", "cam"),)
    assert cfg.masks == ("o2_a", "o2_b")
    assert cfg.fit_vsini and cfg.fit_lsf and cfg.covariance
    hash(cfg)                                        # frozen and hashable: part of the run identity
    assert fit_config(_args("--masks", "none")).masks == "none"


def test_unknown_label_is_one_line_error_before_any_cluster(tmp_path, bossbrain_model_dir, mock_store):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "distlabels", "fit", "--model", str(bossbrain_model_dir), "--spectra",
                           str(mock_store), "--out", str(tmp_path / "c"), "--tie", "mgm,xfe"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlabels: error:") and "xfe" in lines[0], proc.stderr
    assert not (tmp_path / "c").exists()
