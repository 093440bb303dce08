"""img2dataset's distributors, one entry each in DISTRIBUTORS: what each needs installed, the checks
before a run, what its cluster address means, and the Spark session or Ray connection for the run.

One `--cluster` address names the cluster, read by the spec's download.distributor the way each
engine's users expect: a Spark master URL (`spark://host:7077`, `local[N]`, `yarn`, ...; default
`local[processes]`; an already active SparkSession is used as it is), a Ray address (`ray://host:10001`,
`host:6379`, `auto`; else RAY_ADDRESS; default a local Ray started for the run). The old flags
`--spark-master` and `--ray-address` are aliases that also say which engine they are for. cloob stops
only what it started. Executors and workers on other machines write the shards themselves, so with a
cluster that reaches beyond this machine the output must be on storage every node sees. Nothing here
imports pyspark or ray until a run needs them: they are optional extras.

A new distributor is one Distributor entry below (and its extra in pyproject.toml): the spec's
download.distributor, `cloob prepare --cluster`, the flows' `cluster` parameter and `cloob deploy`
all read this table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cloob.errors import CloobError

_JAVA_FIX = "install Java 17 (apt install openjdk-17-jre-headless), or set JAVA_HOME to a Java 17+ installation"
# The forms of a Spark master URL (local, local[4], local-cluster[...], spark://, yarn, k8s://, mesos://)
_SPARK_MASTER = re.compile(r"^(local(\[.*\])?|local-cluster\[.*\]|spark://.+|yarn|k8s://.+|mesos://.+)$")


@dataclass(frozen=True)
class Distributor:
    """One of img2dataset's distributors, as cloob runs it."""

    name: str  # download.distributor in a data spec, img2dataset's `distributor`
    extra: str | None  # the optional extra that installs it (uv sync --extra X); None: always installed
    cluster: str | None  # what --cluster names for it, in words; None: it runs here only, no address
    alias: str | None = None  # the engine's own cluster flag, kept as an alias of --cluster
    check: Callable[[], None] = lambda: None  # beyond its import (pyspark: Java 17)
    accepts: Callable[[str], bool] = lambda address: False  # whether --cluster is this engine's kind of address
    remote: Callable[[str | None], str | None] = lambda address: None  # the cluster in words, if it reaches beyond this machine
    # session(processes, address, worker_env, out_url, out_is_local): the engine for one run
    session: Callable[..., Any] | None = None
    # cannot_import(module): the error that replaces a worker's long traceback when it cannot import module
    cannot_import: Callable[[str], CloobError] | None = None


def _spark_accepts(address: str) -> bool:
    return bool(_SPARK_MASTER.match(address))


def _ray_accepts(address: str) -> bool:
    return not _SPARK_MASTER.match(address)


def _spark_remote(address: str | None) -> str | None:
    return None if spark_is_local(address) else f"Spark master {address}"


def _ray_remote(address: str | None) -> str | None:
    address = address or os.environ.get("RAY_ADDRESS")
    return None if ray_is_local(address) else f"Ray cluster {address}"


def _spark_cannot_import(module: str) -> CloobError:
    python = os.environ.get("PYSPARK_PYTHON") or "unset, so python3 from their PATH"
    return CloobError(f"Spark's executors cannot import {module}: they run PYSPARK_PYTHON ({python})",
                      "set PYSPARK_PYTHON to a Python that has cloob installed on every node (uv sync --extra "
                      "spark; in the docker/ worker images, /app/.venv/bin/python)")


def _ray_cannot_import(module: str) -> CloobError:
    return CloobError(f"the Ray workers cannot import {module}",
                      "install cloob on every node of the cluster (uv sync --extra ray; the docker/ worker images "
                      "have it)")


def _spark_session(processes, address, worker_env, out_url, out_is_local):
    return _spark(processes, address, worker_env)


DISTRIBUTORS: dict[str, Distributor] = {d.name: d for d in (
    Distributor("multiprocessing", None, None),
    Distributor("pyspark", "spark", "a Spark master URL (spark://host:7077, local[N], yarn, k8s://...)",
                alias="--spark-master", check=lambda: check_java(), accepts=_spark_accepts, remote=_spark_remote,
                session=_spark_session, cannot_import=_spark_cannot_import),
    Distributor("ray", "ray", "a Ray address (ray://host:10001, host:6379, auto; else RAY_ADDRESS)",
                alias="--ray-address", accepts=_ray_accepts, remote=_ray_remote,
                session=lambda *a: _ray(*a), cannot_import=_ray_cannot_import),
)}


def names() -> list[str]:
    return list(DISTRIBUTORS)


def get(name: str) -> Distributor:
    if name not in DISTRIBUTORS:
        raise CloobError(f"download.distributor={name} is not one of {', '.join(DISTRIBUTORS)}",
                         "set download.distributor to one of them (cloob/prepare/distributors.py)")
    return DISTRIBUTORS[name]


# ------------------------------------------------------------------------------ the cluster option

class _ClusterFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.cluster, namespace.cluster_flag = values, option_string


def add_cluster_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--cluster ADDRESS, and each engine's own flag (--spark-master, --ray-address) as its alias."""
    takers = [d for d in DISTRIBUTORS.values() if d.cluster]
    parser.set_defaults(cluster=None, cluster_flag="--cluster")
    parser.add_argument("--cluster", metavar="ADDRESS", action=_ClusterFlag,
                        help=f"the cluster that {what}, read by download.distributor: "
                             + "; ".join(f"{d.name}: {d.cluster}" for d in takers))
    for d in takers:
        if d.alias:
            parser.add_argument(d.alias, metavar="ADDRESS", action=_ClusterFlag,
                                help=f"deprecated: --cluster with download.distributor={d.name}")


def check_flags(distributor: str, cluster: str | None, *, whose: str, set_with: str, flag: str = "--cluster") -> None:
    """A cluster address fits the distributor: `flag` is the option it came in (an engine's alias says
    which engine it is for), `whose` names where the distributor came from ("this spec's"), `set_with`
    the option that sets it where the user is (`--set`, `--spec-override`)."""
    if not cluster:
        return
    entry = get(distributor)
    meant = next((d for d in DISTRIBUTORS.values() if d.alias and d.alias == flag), None)
    if meant and meant.name != distributor:
        raise CloobError(f"{flag} is for download.distributor={meant.name}, and {whose} is {distributor}",
                         f"add {set_with} download.distributor={meant.name}, or leave out {flag}")
    takers = [d.name for d in DISTRIBUTORS.values() if d.cluster]
    if not entry.cluster:
        raise CloobError(f"{flag} is for download.distributor={' or '.join(takers)}, and {whose} is {distributor}",
                         f"add {set_with} download.distributor=<{'|'.join(takers)}>, or leave out {flag}")
    if not entry.accepts(cluster):
        raise CloobError(f"{flag} {cluster} is not {entry.cluster}, which download.distributor={distributor} reads",
                         f"give {flag} the {distributor} cluster's address, or {set_with} download.distributor= the "
                         f"engine that {cluster} belongs to")


def check_cluster(distributor: str, out_url: str, out_is_local: bool, cluster: str | None,
                  flag: str = "--cluster") -> dict:
    """The cluster settings of a `cloob prepare`, refused before anything is written when they do not
    fit: an address for another engine, an engine not installed, a local --out with a cluster that
    reaches other machines."""
    check_flags(distributor, cluster, whose="this spec's", set_with="--set", flag=flag)
    check_installed(distributor)
    remote = cluster_of(distributor, cluster)
    if remote and out_is_local:
        raise refuse_local_out(out_url, remote)
    return {"cluster": cluster}


def check_installed(distributor: str) -> None:
    """The engine (and for pyspark, Java 17) is there, else one CloobError saying how to get it."""
    entry = get(distributor)
    if entry.extra is None:
        return
    if importlib.util.find_spec(distributor) is None:
        raise CloobError(f"download.distributor={distributor} needs {distributor}, which is not installed",
                         f"uv sync --extra {entry.extra} (or pip install 'cloob[{entry.extra}]'), or set "
                         "download.distributor=multiprocessing")
    entry.check()


def java_major(java: str) -> int | None:
    """The major version `java -version` reports (8 for 1.8.0_x), None if it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def check_java() -> None:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    where = f"JAVA_HOME={home}" if home else "PATH"
    if not java or not os.path.exists(java):
        raise CloobError(f"pyspark needs Java 17 or later, and there is no java on {where}", _JAVA_FIX)
    major = java_major(java)
    if major is None or major < 17:
        found = f"Java {major}" if major else "a java that does not run"
        raise CloobError(f"pyspark needs Java 17 or later; {java} is {found}", _JAVA_FIX)


def _is_this_machine(host: str) -> bool:
    """Whether `host` is an address of this machine: loopback, or one a socket can bind to here."""
    host = host.strip("[]")
    if host in ("", "localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, addr in infos:
        ip = ipaddress.ip_address(addr[0].split("%")[0])
        if ip.is_loopback:
            continue
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((addr[0], 0))
            except OSError:
                return False
    return True


def spark_is_local(master: str | None) -> bool:
    """local[...], local-cluster[...] and a standalone master on this machine run here."""
    if not master or master.startswith("local"):
        return True
    if master.startswith("spark://"):
        return all(_is_this_machine(h.rsplit(":", 1)[0]) for h in master[len("spark://"):].split(","))
    return False  # yarn, k8s://, mesos://, ...


def ray_is_local(address: str | None) -> bool:
    """No address or "local" starts Ray here; "auto" attaches to one started here (its nodes are
    checked once connected); host:port and ray://host:port are local when the host is this machine."""
    if not address or address in ("local", "auto"):
        return True
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return _is_this_machine(host)


def cluster_of(distributor: str, cluster: str | None) -> str | None:
    """A description of the cluster when it reaches beyond this machine, else None."""
    return get(distributor).remote(cluster)


def refuse_local_out(url: str, cluster: str) -> CloobError:
    return CloobError(
        f"--out {url} is on this machine's disk, but the {cluster} runs workers on other machines: they "
        "would write their shards, and read img2dataset's _tmp, on their own disks",
        "give an --out that every node reaches (s3://bucket/prefix, gs://..., hdfs://...), or use a local "
        "cluster (--cluster local[N] for pyspark; no --cluster for ray)")


@contextlib.contextmanager
def session(distributor: str, *, processes: int, cluster: str | None = None,
            worker_env: dict[str, str] | None = None, out_url: str = "", out_is_local: bool = True):
    """The engine for one img2dataset run: started here (and stopped after) or joined as it is."""
    entry = get(distributor)
    if entry.session is None:
        yield
        return
    with entry.session(processes, cluster, worker_env or {}, out_url, out_is_local):
        yield


@contextlib.contextmanager
def _spark(processes: int, master: str | None, worker_env: dict[str, str]):
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:  # someone else's session (a spark-submit driver): theirs to configure and stop
        yield active
        return
    master = master or f"local[{processes}]"
    builder = (SparkSession.builder.master(master).appName("cloob prepare")
               .config("spark.ui.showConsoleProgress", "false"))
    if spark_is_local(master):
        # Executors here start `python3` from PATH, which need not have img2dataset (or cloob).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # A local driver only hands out one task per shard: without the web UI and with the quick
        # JIT alone, its session starts in about half the time (measured 8-10 s instead of 15-19 s
        # on a busy 2-core machine). cloob's progress bar follows the shards anyway.
        builder = (builder.config("spark.ui.enabled", "false")
                   .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1"))
    for k, v in worker_env.items():  # local executors inherit them anyway; remote ones need telling
        builder = builder.config(f"spark.executorEnv.{k}", v)
    spark = builder.getOrCreate()
    try:
        yield spark
    finally:
        spark.stop()


def _keep_direct(worker_env: dict[str, str], address: str | None) -> dict[str, str]:
    """Ray's gRPC honours http_proxy: with a download proxy set (the demo's), the cluster's own
    addresses must bypass it, here and in the workers, or nothing connects."""
    import ray

    if not any(os.environ.get(k) or worker_env.get(k) for k in ("http_proxy", "HTTP_PROXY", "https_proxy")):
        return worker_env
    hosts = [ray.util.get_node_ip_address()]
    if address and address not in ("local", "auto"):
        hosts.append(urlsplit(address if "://" in address else f"ray://{address}").hostname or "")
    out = dict(worker_env)
    for key in ("no_proxy", "NO_PROXY"):
        have = [h for h in (out.get(key) or os.environ.get(key, "")).split(",") if h]
        os.environ[key] = out[key] = ",".join(have + [h for h in hosts if h and h not in have])
    return out


@contextlib.contextmanager
def _ray(processes: int, address: str | None, worker_env: dict[str, str], out_url: str, out_is_local: bool):
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    worker_env = _keep_direct(worker_env, address)
    if address and address != "local":
        # Workers of a running cluster were started with its environment, not ours.
        ray.init(address=address, runtime_env={"env_vars": worker_env} if worker_env else None,
                 log_to_driver=True)
        if out_is_local:
            elsewhere = sorted({n["NodeManagerAddress"] for n in ray.nodes()
                                if n.get("Alive") and not _is_this_machine(n["NodeManagerAddress"])})
            if elsewhere:
                ray.shutdown()
                raise refuse_local_out(out_url, f"Ray cluster {address} (nodes {', '.join(elsewhere)})")
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline by default, no prompt
        ray.init(address="local", num_cpus=processes, include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()  # disconnects; stops the cluster only when ray.init started it here
