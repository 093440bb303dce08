"""img2dataset's pyspark and ray distributors: the checks before a run, and the Spark session or Ray
connection for it.

The cluster is named the way each engine's users expect: a Spark master URL (`--spark-master`,
default `local[processes]`; an already active SparkSession is used as it is), a Ray address
(`--ray-address`, else RAY_ADDRESS, default a local Ray started for the run). cloob stops only what
it started. Executors and workers on other machines write the shards themselves, so with a cluster
that reaches beyond this machine the output must be on storage every node sees. Nothing here
imports pyspark or ray until a run needs them: they are optional extras.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from urllib.parse import urlsplit

from cloob.errors import CloobError

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
_EXTRA = {"pyspark": "spark", "ray": "ray"}
_JAVA_FIX = "install Java 17 (apt install openjdk-17-jre-headless), or set JAVA_HOME to a Java 17+ installation"


def check_flags(distributor: str, spark_master: str | None, ray_address: str | None, *, whose: str,
                set_with: str) -> None:
    """A cluster flag is for its engine only: `whose` names where the distributor came from ("this
    spec's"), `set_with` the option that sets it where the user is (`--set`, `--spec-override`)."""
    for flag, value, engine in (("--spark-master", spark_master, "pyspark"), ("--ray-address", ray_address, "ray")):
        if value and distributor != engine:
            raise CloobError(f"{flag} is for download.distributor={engine}, and {whose} is {distributor}",
                             f"add {set_with} download.distributor={engine}, or leave out {flag}")


def check_cluster(distributor: str, out_url: str, out_is_local: bool, spark_master: str | None,
                  ray_address: str | None) -> dict:
    """The cluster settings of a `cloob prepare`, refused before anything is written when they do not
    fit: a flag for another engine, an engine not installed, a local --out with a cluster that
    reaches other machines."""
    check_flags(distributor, spark_master, ray_address, whose="this spec's", set_with="--set")
    check_installed(distributor)
    cluster = cluster_of(distributor, spark_master, ray_address)
    if cluster and out_is_local:
        raise refuse_local_out(out_url, cluster)
    return {"spark_master": spark_master, "ray_address": ray_address}


def check_installed(distributor: str) -> None:
    """The engine (and for pyspark, Java 17) is there, else one CloobError saying how to get it."""
    if distributor == "multiprocessing":
        return
    if importlib.util.find_spec(distributor) is None:
        extra = _EXTRA[distributor]
        raise CloobError(f"download.distributor={distributor} needs {distributor}, which is not installed",
                         f"uv sync --extra {extra} (or pip install 'cloob[{extra}]'), or set "
                         "download.distributor=multiprocessing")
    if distributor == "pyspark":
        check_java()


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


def cluster_of(distributor: str, spark_master: str | None, ray_address: str | None) -> str | None:
    """A description of the cluster when it reaches beyond this machine, else None."""
    if distributor == "pyspark" and not spark_is_local(spark_master):
        return f"Spark master {spark_master}"
    if distributor == "ray":
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if not ray_is_local(address):
            return f"Ray cluster {address}"
    return None


def refuse_local_out(url: str, cluster: str) -> CloobError:
    return CloobError(
        f"--out {url} is on this machine's disk, but the {cluster} runs workers on other machines: they "
        "would write their shards, and read img2dataset's _tmp, on their own disks",
        "give an --out that every node reaches (s3://bucket/prefix, gs://..., hdfs://...), or use a local "
        "cluster (--spark-master local[N]; no --ray-address)")


@contextlib.contextmanager
def session(distributor: str, *, processes: int, spark_master: str | None = None, ray_address: str | None = None,
            worker_env: dict[str, str] | None = None, out_url: str = "", out_is_local: bool = True):
    """The engine for one img2dataset run: started here (and stopped after) or joined as it is."""
    if distributor == "pyspark":
        with _spark(processes, spark_master, worker_env or {}):
            yield
    elif distributor == "ray":
        with _ray(processes, ray_address, worker_env or {}, out_url, out_is_local):
            yield
    else:
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
