"""Exactly-once under faults, on a real LocalCluster: a worker killed mid-run, the whole run killed
(SIGINT, then SIGKILL of its process group) and resumed, a partition that fails every time, and a
catalog on an fsspec filesystem. Each ends with ``verify`` proving every input star is in the
catalog exactly once (or, for the poison partition, exactly which rows are missing and why)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from distlabels import paths
from distlabels.cli.main import main
from distlabels.io.location import Location
from distlabels.io.store import open_store
from distlabels.pipeline import run_fit
from distlabels.pipeline.verify import verify_catalog
from tests.pipeline.conftest import CHEAP_YAML, cheap_run, store_ids


def _catalog_ids(loc: Location) -> list[str]:
    ids = []
    for rel in sorted(loc.completed()):
        ids += loc.parquet_file(rel).read(columns=["source_id"]).column("source_id").to_pylist()
    return ids


def _wait(cond, timeout: float, what: str, poll: float = 0.02):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def test_worker_killed_mid_run_still_exactly_once(tmp_path, client, bossbrain_model_dir, small_store):
    """SIGKILL a worker process (by pid) while it computes a task: the nanny restarts it, Dask reruns
    the lost task elsewhere, the run finishes with no failure, and verify passes."""
    out = tmp_path / "cat"
    n_parts = len(open_store(small_store).partitions(4))
    pids_before = client.run(os.getpid)
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        s=run_fit(bossbrain_model_dir, small_store, out, cheap_run(), client=client)))
    runner.start()
    loc = Location.parse(out)

    def busy_worker():
        proc = client.processing()
        busy = [w for w, keys in proc.items() if keys]
        return busy[0] if busy and len(loc.completed()) >= 1 else None

    _wait(lambda: busy_worker() is not None, 120, "a first fragment and a busy worker")
    victim = busy_worker()
    done_at_kill = len(loc.completed())
    os.kill(pids_before[victim], signal.SIGKILL)
    runner.join(timeout=180)
    assert not runner.is_alive()
    s = result["s"]
    assert done_at_kill < n_parts, "the kill came after the run had finished: make the store bigger"
    # The killed worker may have written its fragment before dying: the rerun then finds it complete.
    assert s.status == "complete" and s.n_failed == 0 and s.n_done + s.n_skipped == n_parts
    client.wait_for_workers(2, timeout=60)
    assert pids_before[victim] not in client.run(os.getpid).values()      # really killed and replaced
    rep = verify_catalog(str(out), str(small_store))
    assert rep.ok, rep.problems
    assert sorted(_catalog_ids(loc)) == store_ids(small_store)


def _fit_cmd(cfg_file, model_dir, store, out):
    return [sys.executable, "-m", "distlabels", "fit", "--config", str(cfg_file), "--model", str(model_dir),
            "--spectra", str(store), "--out", str(out), "--no-progress"]


def test_run_interrupted_then_killed_then_resumed(tmp_path, client, bossbrain_model_dir, interrupt_store):
    """Ctrl-C (SIGINT) stops the run cleanly with exit 130; SIGKILL of the whole process group (a
    lost node) leaves only complete fragments; the re-run fits only the missing partitions. The
    catalog is an fsspec ``file://`` URL, so the object-store path (whole-object write + marker) is
    the one under test, across real worker processes."""
    cfg_file = tmp_path / "cheap.yaml"
    cfg_file.write_text(CHEAP_YAML)
    out_url = f"file://{tmp_path / 'cat'}"
    loc = Location.parse(out_url)
    n_parts = len(open_store(interrupt_store).partitions(4))
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")

    def started(p):
        """Block until the run prints its 'fit: N of M partitions to do' line (cluster up, tasks next)."""
        for line in p.stdout:
            if line.startswith("fit:"):
                return
        raise AssertionError("the run ended before it started fitting")

    # 1. Ctrl-C after the first fragment. A suite started in the background without job control (`cmd &`
    # in a script) has SIGINT ignored, which a child inherits through exec, and the run would then
    # ignore the Ctrl-C; a signal with a handler here is reset to the default in the child instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen(_fit_cmd(cfg_file, bossbrain_model_dir, interrupt_store, out_url), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        started(p)
        _wait(lambda: len(loc.completed()) >= 1 or p.poll() is not None, 120, "a first fragment", poll=0.005)
        assert p.poll() is None, "the run finished before the interrupt: make the store bigger"
        os.kill(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("distlabels: interrupted") and "re-run the same command" in lines[-1]
    run = json.loads(loc.read_text(paths.RUN_FILE))
    assert run["status"] == "interrupted"
    after_int = loc.completed()
    assert 1 <= len(after_int) < n_parts

    # 2. Resume, then SIGKILL the whole process group (client, scheduler, nannies, workers).
    p = subprocess.Popen(_fit_cmd(cfg_file, bossbrain_model_dir, interrupt_store, out_url), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        started(p)
        _wait(lambda: len(loc.completed()) >= len(after_int) + 1 or p.poll() is not None, 120, "a new fragment",
              poll=0.005)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
    after_kill = loc.completed()
    assert after_int < after_kill and len(after_kill) < n_parts, "the kill came too late: make the store bigger"

    # 3. Resume to the end: only what is missing is fitted, nothing is fitted twice.
    s = run_fit(bossbrain_model_dir, interrupt_store, out_url, cheap_run(), client=client)
    assert s.n_skipped == len(after_kill) and s.n_done == n_parts - len(after_kill) and s.n_failed == 0
    rep = verify_catalog(out_url, str(interrupt_store))
    assert rep.ok, rep.problems
    assert sorted(_catalog_ids(loc)) == store_ids(interrupt_store)
    runs = json.loads(loc.read_text(paths.RUN_FILE))["history"]
    assert [r["status"] for r in runs][0] == "interrupted" and runs[-1]["status"] == "complete"


def test_poison_partition_is_recorded_and_the_rest_finish(tmp_path, client, bossbrain_model_dir, poison_store,
                                                         capsys):
    root, victim = poison_store
    out = tmp_path / "cat"
    store = open_store(root)
    parts = store.partitions(4)
    rel = victim.relative_to(root).as_posix()
    bad = [p for p in parts if p.fragment == rel]
    s = run_fit(bossbrain_model_dir, root, out, cheap_run(retries=1), client=client)
    assert s.status == "failed" and s.n_failed == len(bad) and s.n_done == len(parts) - len(bad)
    failures = pq.read_table(out / paths.FAILURES_FILE).to_pylist()
    assert sorted(f["partition"] for f in failures) == sorted(f"Norder={p.norder}/Npix={p.npix}/{p.name}" for p in bad)
    assert all(f["attempts"] == 2 and f["error"] for f in failures)
    # The log has one record per finished or failed partition.
    records = [json.loads(line) for line in (out / paths.RUN_LOG).read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("partition_done") == s.n_done and events.count("partition_failed") == len(bad)
    assert all(r["fit_s"] > 0 for r in records if r["event"] == "partition_done")
    # verify names exactly the poisoned rows as missing.
    rep = verify_catalog(str(out), str(root))
    n_bad_rows = sum(p.n_rows for p in bad)
    assert not rep.ok and rep.n_missing == n_bad_rows and rep.n_duplicated_ids == 0 and rep.n_failed_partitions == len(bad)
    # The CLI: exit 1, the summary, then one line saying how to retry.
    capsys.readouterr()
    rc = main(["fit", "--config", str(_yaml(tmp_path)), "--model", str(bossbrain_model_dir), "--spectra", str(root),
               "--out", str(out), "--workers", "1", "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("distlabels: error:") and "_failures.parquet" in err[0] and "re-run" in err[0]


def test_poison_partition_in_a_pack_does_not_take_its_pack_mates_down(tmp_path, client, bossbrain_model_dir,
                                                                        poison_store):
    """Partitions packed 3 to a task: the pack holding the poisoned fragment fails after its retries, its
    partitions are submitted again one per task, and only the poisoned ones end in _failures.parquet."""
    root, victim = poison_store
    out = tmp_path / "cat"
    parts = open_store(root).partitions(4)
    rel = victim.relative_to(root).as_posix()
    bad = [p for p in parts if p.fragment == rel]
    s = run_fit(bossbrain_model_dir, root, out, cheap_run(retries=0, pack_rows=12), client=client)
    assert s.status == "failed" and s.n_failed == len(bad) and s.n_done == len(parts) - len(bad)
    failures = pq.read_table(out / paths.FAILURES_FILE).to_pylist()
    assert sorted(f["partition"] for f in failures) == sorted(f"Norder={p.norder}/Npix={p.npix}/{p.name}" for p in bad)
    events = [json.loads(line)["event"] for line in (out / paths.RUN_LOG).read_text().splitlines()]
    assert events.count("pack_failed") >= 1 and events.count("partition_done") == s.n_done
    rep = verify_catalog(str(out), str(root))
    assert rep.n_missing == sum(p.n_rows for p in bad) and rep.n_duplicated_ids == 0


def _yaml(tmp_path):
    f = tmp_path / "cheap.yaml"
    f.write_text(CHEAP_YAML)
    return f


def test_memory_filesystem_catalog(tmp_path, bossbrain_model_dir, small_store):
    """The object-store code path end to end on fsspec's memory filesystem (one process: threads)."""
    import fsspec
    from distributed import Client, LocalCluster

    url = f"memory://distlabels-test-{os.getpid()}/cat"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        s = run_fit(bossbrain_model_dir, small_store, url, cheap_run(), client=c)
        again = run_fit(bossbrain_model_dir, small_store, url, cheap_run(), client=c)
    assert s.status == "complete" and s.n_done == s.n_partitions and again.n_done == 0
    fs = fsspec.filesystem("memory")
    loc = Location.parse(url)
    frags = loc.fragments()
    assert len(frags) == s.n_partitions
    assert all(fs.exists(f"{loc.root}/{paths.DONE_DIR}/{f}.json") for f in frags)
    rep = verify_catalog(url, str(small_store))
    assert rep.ok, rep.problems
    meta = json.loads(loc.read_text(paths.CATALOG_META))
    assert meta["n_rows"] == len(store_ids(small_store))
    fs.rm(f"{loc.root.rsplit('/', 1)[0]}", recursive=True)


def test_verify_finds_duplicates_and_extras(tmp_path, fitted_catalog, mock_store, capsys):
    """verify against a real fitted catalog: passes as is; a copied fragment (duplicates), a removed
    one (missing) and a quarantined id also in the catalog are each named, exit non-zero."""
    cat = tmp_path / "cat"
    shutil.copytree(fitted_catalog[0], cat)
    assert main(["verify", str(cat), "--spectra", str(mock_store)]) == 0
    assert "OK: every input star" in capsys.readouterr().out
    frags = paths.list_fragments(cat)
    dup = frags[0].with_name("copy-of-" + frags[0].name)
    shutil.copy(frags[0], dup)
    n_dup = pq.ParquetFile(dup).metadata.num_rows
    gone = pq.read_table(frags[1], columns=["source_id"]).column("source_id").to_pylist()
    frags[1].unlink()
    rep = verify_catalog(str(cat), str(mock_store))
    assert rep.n_duplicated_ids == n_dup and rep.n_duplicate_rows == n_dup
    assert rep.n_missing == len(gone) and set(rep.examples["missing"]) <= set(gone)
    rc = main(["verify", str(cat), "--spectra", str(mock_store)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc != 0 and len(err) == 1 and "appear more than once" in err[0] and "not in the catalog" in err[0]
    # Rows the store never had.
    alien = pq.read_table(frags[2]).slice(0, 2)
    alien = alien.set_column(0, "source_id", pa.array(["alien:1", "alien:2"]))
    pq.write_table(alien, frags[2].with_name("alien.parquet"))
    rep = verify_catalog(str(cat), str(mock_store))
    assert rep.n_extra == 2 and sorted(rep.examples["not in store"]) == ["alien:1", "alien:2"]


def test_verify_counts_the_quarantine(tmp_path, fitted_catalog, mock_store):
    store = tmp_path / "store"
    shutil.copytree(mock_store, store)
    cat = tmp_path / "cat"
    shutil.copytree(fitted_catalog[0], cat)
    (store / paths.QUARANTINE_DIR).mkdir()
    pq.write_table(pa.table({"path": ["a.fits", "b.fits"], "source_id": [None, None], "reason": ["truncated", "not FITS"]}),
                   store / paths.QUARANTINE_DIR / "part-0.parquet")
    rep = verify_catalog(str(cat), str(store))
    assert rep.ok and rep.n_quarantined == 2
    first_id = open_store(store).source_ids()[0]
    pq.write_table(pa.table({"path": ["c.fits"], "source_id": [first_id], "reason": ["bad"]}),
                   store / paths.QUARANTINE_DIR / "part-1.parquet")
    rep = verify_catalog(str(cat), str(store))
    assert not rep.ok and rep.n_quarantined == 3 and rep.n_quarantined_in_catalog == 1
