"""img2dataset's pyspark and ray distributors under `cloob prepare`: real local Spark (local[2]) and a
real Ray head on this machine, the demo source and the bad-URL server of test_prepare.py.

The engines are optional extras: without them these tests are skipped locally (the reason says how
to install them) and fail in CI, which installs them."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloob.cli import main as cli_main
from cloob.errors import CloobError
from cloob.prepare import distributors
from cloob.prepare.run import prepare
from cloob.prepare.spec import load_spec

# 3 shards of 8 demo rows: enough for shards to go to both executors/workers, few enough to be quick.
DEMO = ["source.samples=24", "download.shard_size=8", "download.processes=2", "download.threads=2",
        "download.image_size=32", "download.retries=0"]
# The guards' cases: a trickler (cut at the 2 s deadline), a truncated JPEG, a body over the byte cap,
# a picture whose header declares more pixels than max_image_area (img2dataset's own check decodes first).
GUARDED = {"trickle.jpg": "download exceeded the 2s deadline", "truncated.jpg": "truncated JPEG",
           "too-many-bytes.jpg": "response larger than the 200000 byte limit",
           "huge-area.jpg": "2000 x 2000 = 4000000 pixels, above max_image_area 1e+06; refused before decoding"}


def _need(module: str, extra: str) -> None:
    """Skip (locally) or fail (CI) when an engine is missing, with the command that installs it."""
    problem = None
    if importlib.util.find_spec(module) is None:
        problem = f"{module} is not installed: uv sync --extra {extra}"
    elif module == "pyspark":
        try:
            distributors.check_java()
        except CloobError as e:
            problem = f"{e.problem}: {e.fix}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the {module} distributor: {problem}", pytrace=False)
        pytest.skip(problem)


def demo_spec(distributor: str, *more: str):
    return load_spec("demo", DEMO + [f"download.distributor={distributor}", *more])


def guard_spec(tmp_path, base: str, distributor: str, shard_size: int = 8):
    from test_prepare import good_rows, table_spec, write_table

    rows = good_rows(base, 4) + [(f"{base}/bad/{name}", f"bad case {name}") for name in GUARDED]
    tsv = write_table(tmp_path / "rows.tsv", rows)
    return load_spec(table_spec(tsv, processes=2, threads=4, timeout=3, deadline=2, shard_size=shard_size,
                                distributor=distributor))


def assert_guards_fired(m: dict, out: Path) -> None:
    t = m["totals"]
    assert (t["successes"], t["failures"]) == (4, len(GUARDED)), t
    reasons = " | ".join(t["failures_by_reason"])
    for name, words in GUARDED.items():
        assert words in reasons, (name, t["failures_by_reason"])
    # The trickler did not hold its shard for img2dataset's 60 s default deadline: each shard's own
    # download time, from img2dataset's stats (the preparation's whole time also counts Ray's or
    # Spark's start-up: 101 s once on a loaded 2-core machine, against a bound of 90 s then).
    durations = {f.name: json.loads(f.read_text())["duration"] for f in out.glob("*_stats.json")}
    assert durations and max(durations.values()) < 45, durations


@pytest.fixture(scope="module")
def demo_hash(tmp_path_factory) -> str:
    """The content hash of the demo rows prepared by the default distributor, multiprocessing."""
    # One process: the fewest to start, and processes are not part of the hash either.
    return prepare(demo_spec("multiprocessing", "download.processes=1"), str(tmp_path_factory.mktemp("mp") / "ds"),
                   progress=False)["content_hash"]


@pytest.fixture(scope="module")
def spark():
    """pyspark and Java 17 are there (first among a test's fixtures: skip before any work)."""
    _need("pyspark", "spark")


@pytest.fixture(scope="module")
def ray_head():
    """The address of a Ray head with 2 CPUs and no dashboard, on this machine, for the whole module
    (started by a small driver process, so its workers have this environment; gone when it exits)."""
    _need("ray", "ray")
    # Ray 2.5x+ heads require a token (saved in ~/.ray/auth_token); a driver joining one must say
    # RAY_AUTH_MODE=token, as Ray's docs tell users. The fetch processes inherit it from here.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    code = ("import ray, sys; ray.init(num_cpus=2, include_dashboard=False); "
            "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    try:
        address = proc.stdout.readline().strip()
        assert address and proc.poll() is None, "the Ray head did not start"
        yield address
    finally:
        mp.undo()
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cluster_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distributors, "check_installed", lambda distributor: None)  # these need no engine
    out = tmp_path / "ds"
    far = "203.0.113.7"  # TEST-NET-3: never an address of this machine
    cases = [
        (["--set", "download.distributor=pyspark", "--spark-master", f"spark://{far}:7077"],
         ["is on this machine's disk", f"Spark master spark://{far}:7077", "every node reaches"]),
        (["--set", "download.distributor=ray", "--ray-address", f"ray://{far}:10001"],
         ["is on this machine's disk", f"Ray cluster ray://{far}:10001", "s3://"]),
        (["--ray-address", "127.0.0.1:6379"], ["--ray-address is for download.distributor=ray",
                                               "--set download.distributor=ray"]),
        (["--set", "download.distributor=pyspark", "--cluster", f"spark://{far}:7077"],
         ["is on this machine's disk", f"Spark master spark://{far}:7077"]),
        (["--set", "download.distributor=ray", "--cluster", f"{far}:6379"], [f"Ray cluster {far}:6379"]),
        (["--cluster", "local[2]"], ["--cluster is for download.distributor=pyspark or ray, and this spec's is "
                                     "multiprocessing", "--set download.distributor=<pyspark|ray>"]),
        (["--set", "download.distributor=ray", "--cluster", "local[2]"],
         ["--cluster local[2] is not a Ray address", "download.distributor=ray reads"]),
    ]
    for args, words in cases:
        assert cli_main(["prepare", "demo", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err, err
        assert not out.exists()
    monkeypatch.setenv("RAY_ADDRESS", f"{far}:6379")  # the engine's own variable counts as the flag does
    with pytest.raises(CloobError, match=f"Ray cluster {far}:6379"):
        prepare(demo_spec("ray"), str(out), progress=False)
    assert not out.exists()
    # A master or head on this machine is local: a local --out is fine with it.
    assert distributors.spark_is_local("local[2]") and distributors.spark_is_local("spark://127.0.0.1:7077")
    assert distributors.ray_is_local("localhost:6379") and distributors.ray_is_local(None) and distributors.ray_is_local("auto")
    assert not distributors.spark_is_local("yarn") and not distributors.spark_is_local(f"spark://{far}:7077")


def test_a_distributor_is_one_table_entry(tmp_path, monkeypatch):
    """An entry added to DISTRIBUTORS alone is a distributor for the spec, the cluster checks, the
    --cluster help and the session."""
    import argparse
    import contextlib

    started = []

    @contextlib.contextmanager
    def session(processes, address, worker_env, out_url, out_is_local):
        started.append((processes, address))
        yield

    dask = distributors.Distributor(
        "dask", "dask", "a Dask scheduler address (tcp://host:8786)", accepts=lambda a: a.startswith("tcp://"),
        remote=lambda a: a and f"Dask scheduler {a}", session=session,
        cannot_import=lambda module: CloobError(f"the Dask workers cannot import {module}", "install it there"))
    with pytest.raises(CloobError, match=r"download.distributor: .*one of multiprocessing, pyspark, ray"):
        demo_spec("dask")
    monkeypatch.setitem(distributors.DISTRIBUTORS, "dask", dask)
    assert demo_spec("dask").download.distributor == "dask"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dask" else real(name, *a))
    with pytest.raises(CloobError) as e:
        distributors.check_installed("dask")
    assert "needs dask, which is not installed" in e.value.problem and "uv sync --extra dask" in e.value.fix
    with pytest.raises(CloobError, match="--cluster spark://h:7077 is not a Dask scheduler address"):
        distributors.check_flags("dask", "spark://h:7077", whose="this spec's", set_with="--set")
    with pytest.raises(CloobError, match="--cluster is for download.distributor=pyspark or ray or dask"):
        distributors.check_flags("multiprocessing", "tcp://h:8786", whose="this spec's", set_with="--set")
    monkeypatch.setattr(distributors, "check_installed", lambda distributor: None)  # no dask here
    with pytest.raises(CloobError, match="but the Dask scheduler tcp://h:8786 runs workers on other machines"):
        distributors.check_cluster("dask", str(tmp_path / "ds"), True, "tcp://h:8786")
    parser = argparse.ArgumentParser()
    distributors.add_cluster_argument(parser, "downloads")
    assert "dask: a Dask scheduler address" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--cluster", "tcp://h:8786"]).cluster == "tcp://h:8786"
    with distributors.session("dask", processes=3, cluster="tcp://h:8786"):
        assert started == [(3, "tcp://h:8786")]
    from cloob.prepare.download.fetch import _explain_missing_module

    with pytest.raises(CloobError, match="the Dask workers cannot import cloob"):
        _explain_missing_module("dask", RuntimeError("ModuleNotFoundError: No module named 'cloob'"))


def test_the_engines_own_flags_are_aliases_of_cluster():
    import argparse

    parser = argparse.ArgumentParser()
    distributors.add_cluster_argument(parser, "downloads")
    for argv, flag in ((["--cluster", "ray://h:10001"], "--cluster"), (["--ray-address", "ray://h:10001"], "--ray-address")):
        args = parser.parse_args(argv)
        assert (args.cluster, args.cluster_flag) == ("ray://h:10001", flag)
    assert "deprecated: --cluster with download.distributor=pyspark" in " ".join(parser.format_help().split())
    args = parser.parse_args([])
    assert (args.cluster, args.cluster_flag) == (None, "--cluster")


def test_a_missing_engine_or_java_says_how_to_install_it(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(CloobError) as e:
        prepare(demo_spec("ray"), str(tmp_path / "ds"), progress=False)
    assert "needs ray, which is not installed" in e.value.problem and "uv sync --extra ray" in e.value.fix
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "pyspark" else real(name, *a))
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))
    with pytest.raises(CloobError) as e:
        prepare(demo_spec("pyspark"), str(tmp_path / "ds"), progress=False)
    assert "pyspark needs Java 17" in e.value.problem
    assert "install Java 17 (apt install openjdk-17-jre-headless)" in e.value.fix
    fake = tmp_path / "old-java" / "bin" / "java"  # a Java 11 on JAVA_HOME
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(fake.parent.parent))
    with pytest.raises(CloobError, match="is Java 11"):
        prepare(demo_spec("pyspark"), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()


def test_workers_without_cloob_get_the_python_they_ran_and_the_fix(monkeypatch):
    """What a Spark job whose executors lack cloob raises (seen with PYSPARK_PYTHON=/usr/bin/python3,
    a Python without it: a Py4JJavaError whose text holds the worker's traceback), and Ray's kind,
    become one CloobError."""
    from cloob.prepare.download.fetch import _explain_missing_module

    spark_error = RuntimeError("An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe."
                               "\n  File \"<frozen importlib._bootstrap>\", line 1140\n"
                               "ModuleNotFoundError: No module named 'img2dataset'\n\tat org.apache.spark...")
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    with pytest.raises(CloobError) as e:
        _explain_missing_module("pyspark", spark_error)
    assert "cannot import img2dataset: they run PYSPARK_PYTHON (unset, so python3 from their PATH)" in e.value.problem
    assert "set PYSPARK_PYTHON to a Python that has cloob installed on every node" in e.value.fix
    monkeypatch.setenv("PYSPARK_PYTHON", "/usr/bin/python3")
    with pytest.raises(CloobError, match=r"PYSPARK_PYTHON \(/usr/bin/python3\)"):
        _explain_missing_module("pyspark", spark_error)
    with pytest.raises(CloobError, match="the Ray workers cannot import cloob"):
        _explain_missing_module("ray", RuntimeError("RaySystemError: ModuleNotFoundError: No module named 'cloob'"))
    assert _explain_missing_module("ray", RuntimeError("some other failure")) is None


@pytest.mark.slow
def test_pyspark_local_gives_the_multiprocessing_content_hash_and_keeps_the_guards(spark, tmp_path, demo_hash, image_server):
    # The demo's pictures come through its local proxy: the Spark that the fetch process starts
    # passes that environment on to its executors.
    m = prepare(demo_spec("pyspark"), str(tmp_path / "demo"), progress=False)
    assert m["content_hash"] == demo_hash and m["totals"]["successes"] == 24
    assert [r.get("distributor") for r in m["history"]] == ["pyspark"]

    m = prepare(guard_spec(tmp_path, image_server.url, "pyspark"), str(tmp_path / "guards"), progress=False)
    assert_guards_fired(m, tmp_path / "guards")


@pytest.mark.slow
def test_ray_gives_the_multiprocessing_content_hash(ray_head, tmp_path, demo_hash):
    # A running cluster's workers do not have the fetch process's environment: the demo's proxy
    # reaches them through the job's runtime environment.
    m = prepare(demo_spec("ray"), str(tmp_path / "demo"), progress=False, cluster=ray_head)
    assert m["content_hash"] == demo_hash and m["totals"]["successes"] == 24
    assert [r.get("distributor") for r in m["history"]] == ["ray"]


@pytest.mark.slow
def test_ray_workers_keep_the_guards_and_a_lost_shard_is_named_then_fetched(ray_head, tmp_path, image_server):
    # The head's workers were started without CLOOB_FETCH_*: the 2 s deadline and 200 kB cap in the
    # failure messages came with the downloader.
    out = tmp_path / "guards"
    spec = guard_spec(tmp_path, image_server.url, "ray", shard_size=4)  # 00000: 4 good rows, 00001: the bad ones
    first = prepare(spec, str(out), progress=False, cluster=ray_head)
    assert_guards_fired(first, out)
    kept = (out / "00001.tar").read_bytes()

    # Shard 0 cannot be written (its tar's path is a folder): img2dataset's ray distributor drops
    # it and returns success; cloob names it.
    (out / "00000_stats.json").unlink()
    (out / "00000.tar").unlink()
    (out / "00000.tar").mkdir()
    with pytest.raises(CloobError) as e:
        prepare(spec, str(out), progress=False, cluster=ray_head)
    assert "ended without finishing 1 of 1 shards: 00000" in e.value.problem, e.value
    assert "only these shards are fetched again" in e.value.fix

    (out / "00000.tar").rmdir()
    image_server.httpd.requests.clear()
    again = prepare(spec, str(out), progress=False, cluster=ray_head)
    assert again["content_hash"] == first["content_hash"] and again["totals"] == first["totals"]
    assert sorted(image_server.httpd.requests) == [f"/3/48/3/{i}.jpg" for i in range(4)]  # shard 0's rows only
    assert (out / "00001.tar").read_bytes() == kept and not (out / "_tmp").exists()


def test_the_worker_images_carry_the_engines_and_java():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (root / "docker" / name).read_text()
        syncs = [line for line in text.splitlines() if "uv sync --frozen" in line]
        assert syncs and all("--extra spark --extra ray" in line for line in syncs), name
        assert "openjdk-17-jre-headless" in text, name


@pytest.mark.slow
def test_sigterm_to_a_ray_preparation_shuts_its_local_ray_down(tmp_path):
    # The local Ray that the fetch process starts is shut down, its agents (which outlived a
    # SIGTERM by about a minute, the 2026-12-07 report) included; one line says how to resume.
    from test_prepare import assert_stopped_in_one_line, signal_mid_download

    _need("ray", "ray")
    out = tmp_path / "d"
    done, left, names = signal_mid_download(out, "--set", "download.distributor=ray", "--set", "download.processes=2")
    assert "raylet" in names and any("Agent" in n for n in names), names
    assert_stopped_in_one_line(done, left, out)


@pytest.mark.slow
def test_a_killed_ray_preparation_leaves_nothing_running(tmp_path):
    # kill -9 of `cloob prepare`: its fetch process sees its parent go and SIGKILLs the local Ray it
    # started, agents and workers included, then itself (cloob.prepare.download.fetch). Ray's own
    # graceful shutdown, relied on before, left a "python" process running 30 s after the kill in a
    # CI run (2026-12-07); now all is gone in under a second here, and 10 s is ample on a loaded machine.
    from test_prepare import signal_mid_download

    _need("ray", "ray")
    done, left, names = signal_mid_download(tmp_path / "d", "--set", "download.distributor=ray", "--set",
                                            "download.processes=2", sig=signal.SIGKILL, settle_s=10)
    assert done.returncode == -signal.SIGKILL and any("Agent" in n for n in names), names
    assert not left, left
