"""One download round of a preparation: img2dataset in its own process (cloob.prepare.download.fetch)
on the rows of one parquet file, with a progress bar fed by the shards' stats files, its log kept
under _cloob/logs/, and every shard it was given checked finished afterwards (`run_round`).
cloob.prepare.run decides the rounds; cloob.prepare.versions runs its extend rounds through it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

from cloob.errors import CloobError
from cloob.prepare.folder import META
from cloob.prepare.manifest import finished_shards
from cloob.prepare.spec import PretrainSpec
from cloob.prepare.stop import TOKEN_VAR, Stopped, new_token, stop_fetch
from cloob.safetext import safe_lines
from cloob.storage import Location

EXIT_GRACE_S = 10.0  # how long img2dataset may take to exit once every shard of a round is finished


def _proxy_env(proxy: str | None) -> dict[str, str]:
    """The variables that route downloads through `proxy` (none without one)."""
    if not proxy:
        return {}
    # The demo host is reached through the local server as an HTTP proxy. Only plain http is
    # proxied; local endpoints (an S3-compatible store on 127.0.0.1, ...) are kept direct.
    direct = ["127.0.0.1", "localhost"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        direct.append(urlsplit(endpoint).hostname or "")
    existing = [h for h in os.environ.get("no_proxy", os.environ.get("NO_PROXY", "")).split(",") if h]
    no_proxy = ",".join(existing + direct)
    return {"http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": no_proxy, "NO_PROXY": no_proxy}


def _fetch_command(args_file: str) -> list[str]:
    """The fetch process's command: `python -P -m cloob.prepare.download.fetch ARGS.json`.

    -P (Python 3.11+) keeps the working directory off its sys.path, which `-m` would put first: a
    folder there named like a package that img2dataset imports (a `ray/` folder: img2dataset imports
    ray at start-up) would be imported in its place. The flag reaches img2dataset's spawned workers
    too (multiprocessing passes the interpreter's flags on, and they take their sys.path from it)."""
    return [sys.executable, "-P", "-m", "cloob.prepare.download.fetch", args_file]


def _fetch_pythonpath() -> dict[str, str]:
    """PYTHONPATH for the fetch process when this cloob is importable only from the working
    directory (a source tree run as `python -m cloob.cli` without installing it), which -P drops."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["cloob"].__file__ or "")))
    if any(os.path.abspath(p) == root for p in sys.path[1:] if p):
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _fetch_env(spec: PretrainSpec, proxy: str | None, token: str) -> dict[str, str]:
    d = spec.download
    # CLOOB_PREPARE_*: this process, which the workers check before they mark a shard finished
    # (cloob.prepare.download.guards.abandoned). The token marks every process of the round, Ray's
    # too, for the clean-up after a stop (cloob.prepare.stop).
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", CLOOB_FETCH_DEADLINE=str(d.deadline), **{TOKEN_VAR: token},
                CLOOB_FETCH_MAX_BYTES=str(d.max_bytes), PYTHONUNBUFFERED="1", CLOOB_PREPARE_PID=str(os.getpid()),
                CLOOB_PREPARE_HOST=socket.gethostname(), **_proxy_env(proxy), **_fetch_pythonpath())


def _engine_args(spec: PretrainSpec, store: Location, cluster: dict, proxy: str | None) -> dict:
    """What the fetch process needs besides img2dataset's arguments to run on Spark or Ray: the
    cluster, the guards' limits (remote workers do not see our environment) and the proxy."""
    d = spec.download
    return {"cluster": cluster.get("cluster"), "deadline": d.deadline, "max_bytes": d.max_bytes,
            "worker_env": {"NO_ALBUMENTATIONS_UPDATE": "1", **_proxy_env(proxy)},
            "out_is_local": store.is_local}


def img2dataset_args(spec: PretrainSpec, store: Location, url_list: str, mode: str, pending: int | None = None) -> dict:
    """img2dataset's arguments: rows from the parquet file at URL `url_list`, shards into `store`;
    `pending`: how many shards this round has to fetch."""
    d = spec.download
    return {
        "url_list": url_list, "output_folder": store.url(),
        "input_format": "parquet", "url_col": "url", "caption_col": "caption",
        "save_additional_columns": ["row_id"], "output_format": "webdataset",
        "image_size": d.image_size, "resize_mode": d.resize_mode, "resize_only_if_bigger": d.resize_only_if_bigger,
        "encode_format": d.encode_format, "encode_quality": d.encode_quality,
        "number_sample_per_shard": d.shard_size, "processes_count": pool_size(spec, pending), "thread_count": d.threads,
        "timeout": d.timeout, "retries": d.retries, "min_image_size": d.min_image_size,
        "max_image_area": d.max_image_area, "max_aspect_ratio": d.max_aspect_ratio,
        "incremental_mode": mode, "enable_wandb": False, "compute_hash": "sha256", "distributor": d.distributor,
        "user_agent_token": d.user_agent_token, "disallowed_header_directives": d.disallowed_header_directives,
        "oom_shard_count": 5,
    }


def pool_size(spec: PretrainSpec, pending: int | None) -> int:
    """download.processes, but no more processes than shards to fetch on this machine's pool
    (multiprocessing): img2dataset starts all of them whatever the work, and each is a new interpreter
    (about 1 s of CPU before its first row). A retry round of one shard, or a week's delta, starts
    one. On Spark and Ray the number is the cores of a cluster, left as given."""
    d = spec.download
    if d.distributor != "multiprocessing" or pending is None:
        return d.processes
    return max(1, min(d.processes, pending))


def run_round(store: Location, spec: PretrainSpec, url_list: str, mode: str, rows: int, expect: list[int],
               proxy: str | None, cluster: dict, progress: bool) -> dict:
    """One img2dataset run in its own process, with a progress bar fed by the stats files; the rows
    come from `url_list`, a parquet file's path relative to `store`, and shards `expect` must be
    finished afterwards (checked from their stats files: img2dataset's ray distributor drops a shard
    that fails and still returns success, and each distributor gives up on a shard after a retry)."""
    from tqdm import tqdm

    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.monotonic()
    shards = len(expect)
    before = finished_shards(store)
    args = img2dataset_args(spec, store, store.url(url_list), mode, pending=shards)
    with tempfile.TemporaryDirectory(prefix="cloob-fetch-") as tmp:
        args_file, log_file = os.path.join(tmp, "args.json"), os.path.join(tmp, "img2dataset.log")
        error_file = os.path.join(tmp, "error.json")
        with open(args_file, "w") as f:
            json.dump({"img2dataset": args, "engine": _engine_args(spec, store, cluster, proxy),
                       "error_file": error_file}, f)
        bar = tqdm(total=shards, desc=f"{spec.name}: {'retry' if mode == 'extend' else 'download'}",
                   unit="shard", disable=not progress)
        seen, ok, tried = set(before), 0, 0
        with open(log_file, "wb") as log:
            token = new_token()
            proc = subprocess.Popen(_fetch_command(args_file), stdout=log, stderr=subprocess.STDOUT,
                                    env=_fetch_env(spec, proxy, token))
            all_done_at, hung = None, False
            try:
                while proc.poll() is None:
                    time.sleep(0.25 if store.is_local else 2.0)  # listing a bucket costs a request
                    store.refresh()
                    for sid, stem in finished_shards(store).items():
                        if sid not in seen:
                            try:
                                st = store.read_json(f"{stem}_stats.json") or {}
                            except ValueError:
                                # img2dataset writes the stats file in place: caught mid-write (seen
                                # once, empty), it is read again at the next poll
                                continue
                            seen.add(sid)
                            ok, tried = ok + st.get("successes", 0), tried + st.get("count", 0)
                            bar.update()
                            bar.set_postfix_str(f"{ok}/{tried} ok")
                    # img2dataset is reported to hang after its last shard at times
                    # (rom1504/img2dataset#74, #289, #402). Every shard is on disk with its stats
                    # file by then, so stopping it loses nothing: do so after a grace period.
                    if len(seen) - len(before) >= shards:
                        all_done_at = all_done_at or time.monotonic()
                        if time.monotonic() - all_done_at > EXIT_GRACE_S and proc.poll() is None:
                            hung = True
                            proc.kill()
                            proc.wait()
            except BaseException as e:
                # SIGTERM (Stopped) is passed on to it; Ctrl-C reached it too (same process group).
                # Either way it gets a moment to shut down, then its processes are killed.
                stop_fetch(proc, token, stopped=isinstance(e, Stopped))
                raise
        bar.close()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        log_target = f"{META}/logs/{stamp}-{mode}.log"
        failed = not hung and proc.returncode != 0
        tail = _tail(log_file) if failed else ""
        with contextlib.suppress(OSError):
            store.move_in(log_file, log_target)
        if hung:
            with contextlib.suppress(OSError):
                store.remove("_tmp", recursive=True)  # img2dataset's own clean-up, skipped
        elif failed and os.path.exists(error_file):  # the fetch process refused (cluster checks)
            with open(error_file) as f:
                err = json.load(f)
            raise CloobError(err["problem"], err.get("fix"))
        elif failed:
            raise CloobError(f"img2dataset failed (exit {proc.returncode}); last lines of its log:\n{tail}",
                             f"see {store.url(log_target)}; rerun the same command to resume")
    store.refresh()
    after = finished_shards(store)
    lost = [i for i in expect if i not in after]
    if lost:
        names = ", ".join(f"{i:05d}" for i in lost[:20]) + (f", ... ({len(lost)} in all)" if len(lost) > 20 else "")
        again = "rerun with --retry-failed: their rows are given to img2dataset again" if mode == "extend" else \
            "rerun the same command: only these shards are fetched again, finished ones are kept"
        raise CloobError(f"img2dataset ({spec.download.distributor}) ended without finishing {len(lost)} of "
                         f"{shards} shards: {names} (no stats file; see {store.url(log_target)} for why)", again)
    d = spec.download.distributor
    return {"mode": "retry-failed" if mode == "extend" else "download", "started_at": started,
            "seconds": round(time.monotonic() - t0, 2), "rows": rows, "new_shards": len(after) - len(before),
            **({"distributor": d} if d != "multiprocessing" else {}),
            **({"note": "img2dataset did not exit after its last shard; stopped it"} if hung else {})}


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            lines = safe_lines(f.read().decode(errors="replace"))  # it may quote a URL or a server's reply
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in lines[-n:])
