"""What a training run holds from its start to its end, and its checkpoint form: the run record
(`Run`, as open_clip's TrainState), where it stands (`Progress`), and the one place each that saves
(`save`: weights, optimizer, scaler, step, every rank's data positions and RNG) and resumes (`resume`).
cloob.train.loop drives them; cloob.train.checkpoint writes the files atomically."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cloob.config import Recipe
from cloob.data.stream import SKIP_REASONS, StreamState
from cloob.errors import CloobError
from cloob.model import model_config
from cloob.run import reports
from cloob.storage import Location, is_local
from cloob.train import distributed
from cloob.train.checkpoint import CheckpointStore
from cloob.train.global_loss import GlobalLoss
from cloob.train.metrics import MetricsLogger
from cloob.train.plan import Plan
from cloob.version import code_version

log = logging.getLogger("cloob.train")


@dataclass
class Progress:
    """Where the run stands: what a checkpoint keeps besides the weights, the optimizer and the scaler."""

    step: int = 0
    samples_seen: int = 0
    stream: StreamState = field(default_factory=StreamState)  # this rank, current epoch
    skips_before_epoch: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss or gradient (cloob.train.nonfinite)
    retries_before_epoch: int = 0  # shard reads reopened after a dropped connection (cloob.data.remote)
    recipe_hash: str | None = None  # the run's key, where it resumed a run saved under its legacy form

    def start_epoch(self, steps_per_epoch: int) -> None:
        """At an epoch's first step: fold the finished epoch's skip and retry counts into the run's and
        start its stream positions afresh (nothing to do where they are fresh already)."""
        if self.step % steps_per_epoch == 0 and self.stream.batches:
            for k, v in self.stream.skip_totals().items():
                self.skips_before_epoch[k] += v
            self.retries_before_epoch += self.stream.retry_total()
            self.stream = StreamState()

    def advance(self, batch: dict, global_batch: int, nonfinite_skipped: int) -> None:
        """One step done (or skipped as non-finite): the counts and this rank's stream positions."""
        self.nonfinite_skipped = nonfinite_skipped
        self.step += 1
        self.samples_seen += global_batch
        self.stream.update(batch)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Run:
    """What one run holds from its start to its end (as open_clip's TrainState): saving, logging and
    the final line take this, not ten arguments. forward, loss_fn and logger are set as they are made."""

    recipe: Recipe
    info: distributed.DistInfo
    plan: Plan
    store: CheckpointStore
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    forward: Callable | None = None  # the model under DDP and torch.compile, as the recipe asks
    loss_fn: GlobalLoss | None = None
    logger: MetricsLogger | None = None  # the main rank's


def resume(run: Run, resume_from) -> Progress:
    """Weights, optimizer, scaler, step, RNG and data positions from a complete checkpoint, into run."""
    info, plan = run.info, run.plan
    try:
        model_state, state, meta = CheckpointStore.load(resume_from, map_location=info.device)
    except CloobError:
        raise
    except Exception as e:  # a damaged file: one message, not a traceback from torch.load
        raise CloobError(f"cannot load checkpoint {resume_from.url}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}", "delete that checkpoint folder to resume from "
                         "the one before it, or pass train.resume=false to start over") from None
    if meta.get("recipe_hash") not in run.recipe.run_keys():
        raise CloobError(f"{plan.run_dir} holds a run of a different recipe"
                         + (" or data version" if run.recipe.data.content_hash else ""),
                         "pass train.run_name=<new name>, or train.resume=false to start over elsewhere")
    run.model.load_state_dict(model_state)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    progress = Progress(step=state["step"], samples_seen=state["samples_seen"],
                        nonfinite_skipped=state.get("nonfinite_skipped", 0),  # absent before it was counted
                        recipe_hash=meta["recipe_hash"])  # a run keeps the key it was started with
    if (state["world_size"], state.get("steps_per_epoch")) == (info.world_size, plan.steps_per_epoch):
        rank_state = state["ranks"][info.rank]
        progress.stream = StreamState.from_dict(rank_state["stream"])
        progress.skips_before_epoch = rank_state["skips_before_epoch"]
        progress.retries_before_epoch = rank_state.get("retries_before_epoch", 0)  # absent before counted
        set_rng_state(rank_state["rng"])
    else:
        # Positions are per rank and per epoch layout: keep the step, restart the epoch's order.
        log.warning("resuming a run saved on %d ranks with %s steps/epoch on %d ranks with %d: the data "
                    "order restarts within the epoch (not the exact trajectory)", state["world_size"],
                    state.get("steps_per_epoch"), info.world_size, plan.steps_per_epoch)
        progress.stream = StreamState(batches=progress.step % plan.steps_per_epoch)
    return progress


def save(run: Run, progress: Progress, metrics: dict, reason: str):
    """A checkpoint of this step: every rank's stream positions and RNG, saved by the main rank. `reason`
    (meta.json): why it was written, "scheduled" (train.checkpoint_every), "stopped" (a stop signal:
    the run ends here, to be resumed) or "final" (the last step)."""
    recipe, plan, info, store, logger = run.recipe, run.plan, run.info, run.store, run.logger
    cfg_train = recipe.train
    reports.beat("save", progress.step)
    rank_state = {"stream": progress.stream.to_dict(), "skips_before_epoch": dict(progress.skips_before_epoch),
                  "retries_before_epoch": progress.retries_before_epoch,
                  "rng": rng_state()}
    ranks = distributed.all_gather_object(rank_state, info)
    ref = None
    if info.is_main:
        state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "step": progress.step,
                 "samples_seen": progress.samples_seen, "nonfinite_skipped": progress.nonfinite_skipped,
                 "world_size": info.world_size, "steps_per_epoch": plan.steps_per_epoch, "ranks": ranks}
        cfg = {"model_cfg": model_config(recipe.model.arch),
               "preprocess_cfg": dict(getattr(run.model.visual, "preprocess_cfg", {}) or {})}
        meta = {"arch": recipe.model.arch, "method": recipe.loss.method, "recipe_name": recipe.name,
                "recipe_hash": progress.recipe_hash or recipe.content_hash(), "run_name": plan.run_name,
                "epoch_size": plan.num_samples,
                "samples_seen": progress.samples_seen, "world_size": info.world_size,
                "total_steps": plan.total_steps, "code_version": code_version(), "metrics": metrics, "time": time.time(),
                "reason": reason}
        if recipe.data.content_hash:
            meta["data"] = {"content_hash": recipe.data.content_hash, "version": recipe.data.version}
        if cfg_train.init_sha256:
            meta["init_from"] = {"ref": cfg_train.init_from, "entry": cfg_train.init_entry,
                                 "checkpoint": cfg_train.init_checkpoint, "sha256": cfg_train.init_sha256}
        ref = store.save(progress.step, run.model.state_dict(), cfg, state, meta, keep=recipe.train.keep_checkpoints)
        if logger:
            logger.flush()
            if not is_local(store.fs):  # metrics.jsonl and the trackers' files, from the local mirror
                Location(plan.run_dir).copy_in(str(logger.dir))
    distributed.barrier(info)
    return ref if info.is_main else store.ref(progress.step)


