"""Every YAML in configs/ loads through the CLI exactly as a user would pass it, so none can rot."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distlabels.cli.main import _apply_yaml, build_parser
from distlabels.cli.production import run_config
from distlabels.config import FitConfig, RunConfig
from distlabels.pipeline.cluster import KINDS, is_address

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Which subcommand reads each file (a new config must be added here, or this test fails).
USED_BY = {"demo.yaml": "demo", "fit-local.yaml": "fit", "lamost-payne.yaml": "fit", "desi.yaml": "fit",
           "k8s-cluster.yaml": "k8s", "ingest-local.yaml": "ingest", "apogee-payne.yaml": "fit"}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(USED_BY)


@pytest.mark.parametrize("name", [n for n, sub in USED_BY.items() if sub == "fit"])
def test_fit_configs_build_a_run_config(name):
    argv = ["fit", "--config", str(CONFIGS / name), "--model", "m", "--spectra", "s", "--out", "o"]
    ns = build_parser().parse_args(argv)
    ns = _apply_yaml(ns, ns.parser)
    cfg = run_config(ns)
    assert isinstance(cfg, RunConfig) and isinstance(cfg.fit, FitConfig)
    assert cfg.cluster in KINDS or is_address(cfg.cluster)
    assert cfg.device in ("auto", "cpu", "cuda") and cfg.task_rows >= 100
    raw = yaml.safe_load((CONFIGS / name).read_text())
    for key, value in (raw.get("fit") or {}).items():        # every kernel option reached the FitConfig
        assert getattr(cfg.fit, key) == value, key
    for key in ("cluster", "device", "task_rows", "retries", "gpu_memory_fraction", "workers"):
        if key in raw:
            assert getattr(cfg, key) == raw[key], key
    # The command line still wins over the file.
    ns = build_parser().parse_args(argv + ["--cluster", "local", "--task-rows", "123"])
    cfg = run_config(_apply_yaml(ns, ns.parser))
    assert cfg.cluster == "local" and cfg.task_rows == 123


def test_demo_config_loads():
    ns = build_parser().parse_args(["demo", "--config", str(CONFIGS / "demo.yaml")])
    ns = _apply_yaml(ns, ns.parser)
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    for key, value in raw.items():
        got = getattr(ns, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_ingest_config_loads_and_the_command_line_wins():
    argv = ["ingest", "files/", "--out", "store/", "--config", str(CONFIGS / "ingest-local.yaml")]
    raw = yaml.safe_load((CONFIGS / "ingest-local.yaml").read_text())
    ns = build_parser().parse_args(argv)
    ns = _apply_yaml(ns, ns.parser)
    for key, value in raw.items():
        assert getattr(ns, key) == value, key
    ns = build_parser().parse_args(argv + ["--workers", "7"])
    assert _apply_yaml(ns, ns.parser).workers == 7


@pytest.mark.parametrize("sub", ["fit", "verify"])
def test_production_subcommands_have_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([sub, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: distlabels {sub}")
    assert ("--cluster" in out and "local-cuda" in out) if sub == "fit" else "--spectra" in out


def test_verify_needs_the_store(capsys):
    from distlabels.cli.main import main

    assert main(["verify", "somewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distlabels: error: verify needs --spectra")


@pytest.mark.parametrize("extra, rows", [([], 500), (["--device", "cpu"], 500), (["--cluster", "local-cuda"], 32768),
                                         (["--device", "cuda"], 32768),
                                         (["--cluster", "local-cuda", "--task-rows", "2000"], 2000)])
def test_task_rows_default_follows_the_device(extra, rows):
    # An H100 fits ~7,000 spectra/s in batches of 8,192 and ~20,000 at 49,152 (benchmarks/RESULTS.md): GPU
    # runs default to tasks of 32,768 spectra, CPU runs to 500; an explicit --task-rows always wins.
    ns = build_parser().parse_args(["fit", "--model", "m", "--spectra", "s", "--out", "o"] + extra)
    assert run_config(_apply_yaml(ns, ns.parser)).task_rows == rows


def test_run_config_resolves_the_task_rows_default_itself():
    # The same default for library users (run_fit(..., RunConfig(cluster="local-cuda"))) as for the CLI.
    assert RunConfig().task_rows == 500 and RunConfig(device="cpu").task_rows == 500
    assert RunConfig(cluster="local-cuda").task_rows == 32768
    assert RunConfig(cluster="tcp://h:8786", device="cuda").task_rows == 32768
    assert RunConfig(cluster="local-cuda", task_rows=64).task_rows == 64
