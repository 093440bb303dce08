"""img2dataset, run in its own process, with the download guards it lacks (cloob.prepare.download.guards).

Run as `python -m cloob.prepare.download.fetch ARGS.json` (cloob.prepare.run does): img2dataset installs a SIGINT
handler and a process pool, so it must own its process. ARGS.json holds img2dataset's keyword
arguments (`img2dataset`), the engine's settings (`engine`) and where to leave a CloobError for the
parent (`error_file`; the exit code is then 2).

Under the multiprocessing distributor the pool starts with "spawn", which imports this module again
as `__mp_main__` in every worker, so the guards are installed there too, with their limits from
CLOOB_FETCH_DEADLINE and CLOOB_FETCH_MAX_BYTES. Under pyspark and ray, cloob.prepare.download.guards'
GuardedDownloader takes the place of img2dataset's Downloader and carries the guards to every
executor and worker (cloob.prepare.distributors starts or joins the cluster).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _read_args(argv: list[str]) -> dict | None:
    """ARGS.json, or None where it cannot be read (main reads it again then, and fails saying why)."""
    try:
        with open(argv[1]) as f:
            args = json.load(f)
    except (IndexError, OSError, ValueError):
        return None
    return args if isinstance(args, dict) else None


# Read once, before anything heavy is imported: the distributor decides what this process may import.
_ARGS = _read_args(sys.argv) if __name__ == "__main__" else None

# Only when this module is the program (or, in a spawned worker, its copy): imported elsewhere, it must
# not take torch away from its importer. Ray stays importable where it distributes the download.
if __name__ in ("__main__", "__mp_main__"):
    from cloob.prepare.download.lean import make_lean

    make_lean(keep_ray=_ARGS is not None and (_ARGS.get("img2dataset") or {}).get("distributor") == "ray")


def _exit_with(parent: int, interval_s: float = 0.25) -> None:
    """Exit this process soon after `parent` (the fetch process) is no longer its parent.

    Without it, img2dataset's spawned processes (pool workers are daemons) go on downloading their
    shard after a kill, and may still be writing its tar when a resumed run writes the same one.
    Polling rather than PR_SET_PDEATHSIG: that signal fires when the parent *thread* that started
    the worker ends, and multiprocessing starts replacement workers from a thread that ends during
    Pool.terminate(). The pid comes from the fetch process itself (CLOOB_FETCH_PID), not from
    getppid() here: a worker still starting when the fetch process was killed has been reparented
    already, and must exit at once."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="cloob-exit-with-parent", daemon=True).start()


if __name__ == "__mp_main__":  # one of img2dataset's spawned processes (pool workers, its logger)
    # Before the heavy imports below: they take seconds on a busy machine.
    _FETCH_PID = int(os.environ.get("CLOOB_FETCH_PID") or os.getppid())
    _exit_with(_FETCH_PID)

from cloob import storage  # noqa: E402,F401  (registers the S3 time limits for img2dataset's shard writes, here and in pool workers)
from cloob.prepare.download import guards  # noqa: E402  (importing it installs the download guards, here and in pool workers)

if __name__ == "__mp_main__":
    guards.set_parent(_FETCH_PID)  # a worker of a killed preparation must not mark a shard finished


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies: a killed `cloob prepare` must not leave
    img2dataset downloading in the background (its pool workers then see their task pipe close and
    exit). Not under ray: see _end_round_with_parent.

    Only in img2dataset's main process, never in its pool workers: the signal fires when the parent
    *thread* ends, and replacement workers are started by the pool's worker-handler thread, which
    ends during Pool.terminate(). A worker killed then, while idle, dies holding the task queue's
    lock, and terminate() waits on that lock forever (seen here as img2dataset hanging after its
    last shard)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _end_round_with_parent(parent: int, interval_s: float = 0.2) -> None:
    """Under ray: once `parent` (`cloob prepare`) is no longer this process's parent, SIGKILL the local
    Ray this process started (its raylet, GCS, agents and workers), whatever else it started, then
    itself.

    Nobody waits for this round any more, so nothing is gained by Ray's graceful shutdown, and it
    cannot be relied on: SIGTERM to this process (Ray's handler, then ray.shutdown) ended it in 5 s
    here, but left a process running more than 30 s after the kill in a CI run on a loaded machine
    (2026-12-07). A plain parent-death SIGKILL of this process alone is no better: Ray's agents, whose
    parent is the raylet, lived on for about a minute. So the tree is taken while the raylet still
    holds its agents and workers, and the workers that left it are found by the round's token
    (cloob.prepare.stop). A SIGTERM from a live `cloob prepare` still goes to Ray's handler; the
    parent then cleans up after it (stop_fetch)."""
    import threading

    import psutil

    from cloob.prepare.stop import TOKEN_VAR, marked_by

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        # All found before any is killed: the driver's core worker exits this process as soon as it
        # sees its raylet die, and a raylet left alive would start new workers.
        try:
            doomed = psutil.Process().children(recursive=True)
        except psutil.Error:
            doomed = []
        token = os.environ.get(TOKEN_VAR)
        doomed += marked_by(token) if token else []
        for p in doomed:
            try:
                p.kill()
            except psutil.Error:
                pass
        os._exit(1)

    threading.Thread(target=watch, name="cloob-end-round-with-parent", daemon=True).start()


def _download_distributed(kwargs: dict, engine: dict) -> None:
    """img2dataset on a Spark or Ray cluster, with GuardedDownloader in place of its Downloader."""
    import functools

    import img2dataset  # noqa: F401  (loads img2dataset.main)

    from cloob.prepare.distributors import session

    # `import img2dataset.main` would give the CLI function that img2dataset/__init__ re-exports
    # under that name, and setting an attribute on it would do nothing.
    sys.modules["img2dataset.main"].Downloader = functools.partial(
        guards.GuardedDownloader, deadline=engine["deadline"], max_bytes=engine["max_bytes"])
    with session(kwargs["distributor"], processes=kwargs["processes_count"], cluster=engine.get("cluster"),
                 worker_env=engine.get("worker_env") or {},
                 out_url=kwargs["output_folder"], out_is_local=engine.get("out_is_local", True)):
        try:
            img2dataset.download(**kwargs)
        except Exception as e:
            _explain_missing_module(kwargs["distributor"], e)
            raise


def _explain_missing_module(distributor: str, error: Exception) -> None:
    """A worker that cannot import cloob or img2dataset fails every shard with a long Java or Ray
    traceback; say instead which Python it ran and how to give it one that works."""
    import re

    from cloob.prepare.distributors import get

    m = re.search(r"No module named '([\w.]+)'", str(error))
    explain = get(distributor).cannot_import
    if m and explain:
        raise explain(m.group(1)) from None


def main(argv: list[str], args: dict | None = None) -> int:
    import img2dataset

    from cloob.errors import CloobError

    if args is None:
        with open(argv[1]) as f:
            args = json.load(f)
    kwargs = args["img2dataset"]
    if kwargs.get("distributor") == "ray":
        _end_round_with_parent(int(os.environ.get("CLOOB_PREPARE_PID") or os.getppid()))  # gone already: getppid() is not it
    else:
        _die_with_parent()
    os.environ["CLOOB_FETCH_PID"] = str(os.getpid())  # for img2dataset's spawned processes (_exit_with)
    try:
        if kwargs.get("distributor", "multiprocessing") == "multiprocessing":
            img2dataset.download(**kwargs)
        else:
            _download_distributed(kwargs, args.get("engine") or {})
    except CloobError as e:
        print(f"cloob: {e}", file=sys.stderr, flush=True)
        if args.get("error_file"):
            with open(args["error_file"], "w") as f:
                json.dump({"problem": e.problem, "fix": e.fix}, f)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv, _ARGS))
