"""Tracking backends: where a run's scalars go besides metrics.jsonl (`train.report_to`).

metrics.jsonl is the contract (the launcher, the flows, the report and the benchmarks read it) and is
always written, by `cloob.train.metrics.MetricsLogger`. The backends here are extra views of the same
numbers, under the same tags (train/loss, data/skipped, zeroshot/<set>/top1, ...):

    tensorboard  event files in <run>/tensorboard/ (the default, as before this module)
    wandb        a Weights & Biases run named as the run, the recipe as its config; WANDB_MODE=offline
                 works without an account

`SINKS` is the one list of backends: a name and a factory that takes a `RunContext` and returns a
`Sink` (three methods: log, flush, close). A new backend is one class and one entry there
(docs/tracking.md). Only the main rank opens sinks, and a backend's package is imported only when a
run asks for it.

A backend that cannot start fails the run at its start, with the fix (a run the user asked to track
should not run untracked for days); one that fails later is dropped with one warning and the run goes
on (metrics.jsonl still has every step). Evaluation results reach the same backends through
`log_evaluation` (called by cloob.evaluate.pairs for each new row of a run's checkpoint): there a
failing backend is only a warning, since the results table is the evaluation's contract.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from cloob.errors import CloobError

log = logging.getLogger(__name__)

DEFAULT_REPORT_TO = ("tensorboard",)
_NONE = ("", "none", "null", "false")


class Sink(Protocol):
    """A tracking backend, opened for one run (or one evaluation of a run's checkpoint)."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars at a training step, under their tags (train/loss, zeroshot/shapes/top1, ...)."""

    def flush(self) -> None:
        """Make what was logged durable (called before every checkpoint is written and uploaded)."""

    def close(self) -> None:
        """Flush and release; called once."""


@dataclass(frozen=True)
class RunContext:
    """What a backend may need to open a run's record."""

    name: str  # the run's name: the W&B run's name, and its id is derived from it
    log_dir: Path  # a local folder for the backend's files: the run folder, or its local mirror
    config: dict = field(default_factory=dict)  # the run's recipe, as recipe.yaml holds it
    resume_step: int = 0  # the step training resumes from (0: a new run)
    purpose: Literal["train", "eval"] = "train"


class TensorBoardSink:
    """Event files in <log_dir>/tensorboard. In training, purge_step drops the events after the step
    resumed from (a resumed run shows one trajectory); an evaluation adds its own event file."""

    def __init__(self, ctx: RunContext):
        from torch.utils.tensorboard import SummaryWriter  # ImportError: see open_sinks

        purge = ctx.resume_step + 1 if ctx.purpose == "train" else None
        self._writer = SummaryWriter(str(ctx.log_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, v in scalars.items():
            self._writer.add_scalar(tag, v, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_run_id(run_name: str) -> str:
    """The W&B run id of a run: derived from its name, so a resumed run and the evaluations of its
    checkpoints continue the same W&B run. (Hashed: W&B ids refuse some characters our names allow.)"""
    return "cloob-" + hashlib.sha256(run_name.encode()).hexdigest()[:16]


class WandbSink:
    """A W&B run: name = the run's name, id = wandb_run_id(name) (resumed, never a second run),
    config = the recipe, files under <log_dir>/wandb (or WANDB_DIR), project WANDB_PROJECT (default
    "cloob"), mode WANDB_MODE (offline: no account, `wandb sync` later).

    Logged directly (run.log), not through sync_tensorboard: that would tie W&B to the TensorBoard
    sink being on, patch TensorBoard's writer process-wide, and miss the evaluation's separate event
    files. Every scalar is plotted against `global_step` (define_metric), not W&B's own _step: a
    resumed run logs steps again and an evaluation logs an earlier checkpoint's step after the
    training's last one, and W&B drops a _step lower than one it has seen."""

    STEP = "global_step"

    def __init__(self, ctx: RunContext):
        self._purpose = ctx.purpose
        try:
            import wandb
        except ImportError as e:
            raise CloobError(f"train.report_to has wandb, but wandb cannot be imported ({e})",
                             "install it (uv pip install wandb) or leave wandb out of train.report_to") from None
        try:
            self._run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "cloob", name=ctx.name, id=wandb_run_id(ctx.name),
                resume="allow", config=_redacted(ctx.config), dir=os.environ.get("WANDB_DIR") or str(ctx.log_dir),
                job_type=ctx.purpose, reinit="create_new",
                # Read here, each time: wandb keeps the settings of its first run in a process otherwise.
                mode=os.environ.get("WANDB_MODE") or None,
                # console="off": the run's own stdout/stderr stay as they are (the launcher reads them).
                settings=wandb.Settings(console="off"))
            self._run.define_metric(self.STEP)
            self._run.define_metric("*", step_metric=self.STEP)
        except Exception as e:  # noqa: BLE001 -- wandb raises its own errors, and network ones
            raise CloobError(f"wandb could not start the run's W&B record: {type(e).__name__}: {_one_line(e)}",
                             "log in (wandb login, or WANDB_API_KEY), or set WANDB_MODE=offline to keep the "
                             "record on disk, or leave wandb out of train.report_to") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({**scalars, self.STEP: step})

    def flush(self) -> None:
        pass  # wandb writes in its own process; nothing to push from here

    def close(self) -> None:
        self._run.finish()
        if self._purpose == "eval":
            # finish() returns before wandb's service has written the run's file (seen with 0.31.0: a
            # 7-byte .wandb right after it); the evaluation may copy that file to the store next, and
            # then end. teardown() waits for the service, so the file is whole when this returns.
            import wandb

            wandb.teardown()


# THE list of tracking backends: train.report_to names entries of it.
SINKS: dict[str, Callable[[RunContext], Sink]] = {
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
}


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """train.report_to as a list of backend names: "tensorboard,wandb", a list, or ""/none (none).
    An unknown name is one error naming the known ones."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if name in _NONE:
            continue
        if name not in SINKS:
            raise CloobError(f"unknown tracking backend {item.strip()!r} (known: "
                             f"{', '.join(SINKS)})", "use e.g. train.report_to=tensorboard,wandb, or none "
                             "(metrics.jsonl is always written)")
        if name not in names:
            names.append(name)
    return names


def open_sinks(names: Iterable[str], ctx: RunContext) -> dict[str, Sink]:
    """The named backends, opened. A backend that cannot start raises CloobError; TensorBoard missing
    its package is a warning (as it was before this module: metrics.jsonl has everything)."""
    sinks: dict[str, Sink] = {}
    try:
        for name in names:
            try:
                sinks[name] = SINKS[name](ctx)
            except ImportError:
                log.warning("%s is not installed; metrics go to metrics.jsonl and the other backends only", name)
    except BaseException:
        close_all(sinks)
        raise
    return sinks


def close_all(sinks: dict[str, Sink]) -> None:
    for name, sink in list(sinks.items()):
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 -- closing one must not stop the others
            log.warning("tracking backend %s failed to close: %s: %s", name, type(e).__name__, _one_line(e))


# ------------------------------------------------------------------------------ evaluation results

_WANDB_LOCK = threading.Lock()  # evaluations in threads of one process: one W&B run of a run open at a time


def eval_scalars(row: dict) -> dict[str, float]:
    """The tags an evaluation row gives: zeroshot/<set>/top1, top5 (and the set's main metric), or
    retrieval/<set>/i2t_r1 ... t2i_r10."""
    ds = row["dataset"]
    if row.get("task") == "retrieval":
        keys = [k for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10") if k in row]
        return {f"retrieval/{ds}/{k}": float(row[k]) for k in keys if row[k] is not None}
    keys = ["top1", "top5", *([row["main_metric"]] if row.get("main_metric") not in (None, "top1", "top5") else [])]
    return {f"zeroshot/{ds}/{k}": float(row[k]) for k in keys if row.get(k) is not None}


def log_evaluation(run_dir: str, step: int, run_name: str, scalars: dict[str, float]) -> list[str]:
    """An evaluation of a run's checkpoint at `step`, into the backends the run's recipe.yaml names:
    a new TensorBoard event file in <run>/tensorboard/, the run's W&B run resumed. Returns the backends
    written. Never raises: a failure is one warning (the row is in the results table already).

    A local run folder is written in place. A remote one (s3://...) is written to a temporary local
    folder, then its files are copied into the run folder (TensorBoard cannot append to an object,
    and each evaluation's event file is a new file anyway)."""
    try:
        return _log_evaluation(run_dir, step, run_name, scalars)
    except Exception as e:  # noqa: BLE001 -- a store that fails in a way not foreseen below: still a warning
        log.warning("the evaluation of %s at step %d was not logged to a tracker: %s: %s", run_name, step,
                    type(e).__name__, _one_line(e))
        return []


def _log_evaluation(run_dir: str, step: int, run_name: str, scalars: dict[str, float]) -> list[str]:
    from cloob.registry.lineage import read_recipe
    from cloob.storage import Location

    recipe = read_recipe(run_dir)
    if not isinstance(recipe, dict):  # not a run folder of `cloob train` (or unreadable): nothing to add to
        log.info("not logging the evaluation of %s to a tracker: no recipe.yaml in %s", run_name, run_dir)
        return []
    try:
        names = parse_report_to((recipe.get("train") or {}).get("report_to", list(DEFAULT_REPORT_TO)))
    except CloobError as e:
        log.warning("not logging the evaluation of %s to a tracker: its recipe.yaml: %s", run_name, e.problem)
        return []
    if not names or not scalars:
        return []
    try:
        loc = Location(run_dir)
    except (ValueError, ImportError) as e:
        log.warning("not logging the evaluation of %s to a tracker: %s", run_name, _one_line(e))
        return []
    with _WANDB_LOCK if "wandb" in names else nullcontext(), \
            (nullcontext(loc.root) if loc.is_local else tempfile.TemporaryDirectory(prefix="cloob-eval-logs-")) as d:
        ctx = RunContext(name=run_name, log_dir=Path(d), config=recipe, resume_step=step, purpose="eval")
        written = []
        for name in names:
            try:
                sink = open_sinks([name], ctx).get(name)
                if sink is None:
                    continue
                try:
                    sink.log(step, scalars)
                finally:
                    sink.close()
                written.append(name)
            except Exception as e:  # noqa: BLE001 -- a tracker must not fail an evaluation
                msg = e.problem if isinstance(e, CloobError) else f"{type(e).__name__}: {_one_line(e)}"
                log.warning("the evaluation of %s at step %d was not logged to %s: %s", run_name, step, name, msg)
        if not loc.is_local and written:
            try:
                loc.copy_in(d)
            except Exception as e:  # noqa: BLE001
                log.warning("the evaluation's tracking files of %s could not be copied into %s: %s: %s",
                            run_name, loc.url(), type(e).__name__, _one_line(e))
                return []
        return written


def _redacted(value):
    """The recipe with user:password@ cut out of every URL in it (it goes to a third-party service)."""
    from cloob.storage import redact

    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def _one_line(e: object, limit: int = 300) -> str:
    from cloob.storage_errors import one_line

    return one_line(e, limit)
