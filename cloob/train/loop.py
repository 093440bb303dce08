"""Train CLOOB or CLIP on webdataset shards: single process, or DDP under torchrun.

    cloob train tiny data.train=./shards train.steps=200
    torchrun --nproc_per_node 4 -m cloob.train cloob_rn50_cc3m data.train=s3://bucket/cc3m

Everything the run needs is checked before anything is written, the first batch of data included.
Checkpoints are step-based and atomic; a rerun of the same command resumes from the latest one and
follows the same trajectory as an uninterrupted run (model, optimizer, scaler, step, RNG and
per-worker data positions restored). Under cloob.run.launch every rank reports its progress and its
error as data (cloob.run.reports) instead of printing them. SIGTERM stops every rank after the same
step with a checkpoint of it (cloob.train.preemption); a step with a non-finite loss or gradient is
skipped and counted (cloob.train.nonfinite).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cloob.config import Recipe, load_recipe
from cloob.data.stream import SKIP_REASONS, ShardStream
from cloob.data.tensor_transform import TensorTrainTransform
from cloob.errors import CloobError
from cloob.model import clamp_inv_tau_, create_model
from cloob.run import reports
from cloob.storage import Location, is_local
from cloob.train import distributed, preemption
from cloob.train.boundary import agree
from cloob.train.checkpoint import CheckpointStore, load_init_weights, remove_temp_files
from cloob.train.failures import QuietStorageTasks, ReportErrors, as_cloob_error, checked, writing_checkpoint
from cloob.train.global_loss import GlobalLoss
from cloob.train.metrics import MetricsLogger
from cloob.train.nonfinite import NonfiniteSteps
from cloob.train.nonfinite import flag as nonfinite_flag
from cloob.train.optim import build_optimizer, lr_factor, set_lr
from cloob.train.plan import plan_run, run_lock
from cloob.train.run_state import Progress, Run, resume, save

# The longest wait for one batch from the data workers (their start and a shard's first bytes from a
# bucket included): past it the run fails with one message instead of waiting on a stuck worker.
LOADER_TIMEOUT_S = 600.0


def _check_writable(run_dir: str) -> None:
    try:
        Location(run_dir).makedirs()
    except (OSError, ValueError) as e:
        raise CloobError(f"cannot create the run folder {run_dir}: {e}", "choose a writable train.output") from None


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(recipe: Recipe) -> dict:
    """Run (or resume) one training run; returns a summary with the final checkpoint's URL.

    Errors of the environment (a full disk, a lost object store, unusable data) are raised as
    CloobError (cloob.train.failures)."""
    reports.beat("start", 0)
    info = distributed.init(recipe.train.device, recipe.train.process_group_timeout_s)
    try:
        with _run_lock(recipe, info), preemption.stop_at_step_boundary(), contextlib.ExitStack() as cleanup:
            return _train(recipe, info, cleanup)
    except Exception as e:
        err = as_cloob_error(e, run_dir=recipe.run_dir(), data=recipe.data.train)
        if err is None or err is e:
            raise
        raise err from None
    finally:
        distributed.shutdown()


def _run_lock(recipe: Recipe, info: distributed.DistInfo):
    """One run per run folder: the main rank holds the folder's lock for the whole run, taken before
    anything is written there; a second run on it is refused, naming the first (cloob.lock)."""
    return run_lock(recipe) if info.is_main else contextlib.nullcontext()


def _stop_workers(batch_iter) -> None:
    """Stop the DataLoader's workers now, as leaving the loop does. On an error the iterator lives on
    in the traceback until the interpreter exits, and there torch skips its own shutdown: the workers
    were then ended by multiprocessing's atexit SIGTERM, which torch's SIGCHLD handler reported as
    a 15-line "Exception ignored in atexit callback ... DataLoader worker (pid N) is killed by signal:
    Terminated" before the one error (fault report A8, 1 run in 3 under 2 ranks)."""
    shutdown = getattr(batch_iter, "_shutdown_workers", None)  # absent without workers (data.workers=0)
    if shutdown is not None:
        shutdown()


def _train(recipe: Recipe, info: distributed.DistInfo, cleanup: contextlib.ExitStack) -> dict:
    # -- the plan: data, batch and steps, checked before anything is made or written
    cfg = recipe.train
    plan = plan_run(recipe, info.world_size)
    store = CheckpointStore(plan.run_dir)
    resume_from = store.latest() if cfg.resume else None

    # -- the model, the optimizer and the grad scaler; resume from the latest complete checkpoint
    model, train_tf, tokenizer = _make_model(recipe, info, warm_start=resume_from is None)
    run = Run(recipe, info, plan, store, model, build_optimizer(model, recipe.optim),
               torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16"))
    progress = resume(run, resume_from) if resume_from is not None else Progress()
    reports.beat("start", progress.step)

    # -- DDP, compile, the loss
    ddp = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
        if info.distributed else model
    run.forward = torch.compile(ddp) if recipe.model.compile else ddp
    run.loss_fn = GlobalLoss(recipe.loss, info, plan.global_batch)
    if info.is_main:
        _announce(run, resume_from)

    # -- the data: one DataLoader for the whole run; its workers go on from epoch to epoch by themselves
    batch_iter = _batch_iter(run, progress, train_tf, tokenizer)
    cleanup.callback(_stop_workers, batch_iter)  # however _train ends, before the run lock is released
    batches = checked(batch_iter)
    if progress.step < plan.total_steps:
        # Shards can look right and hold nothing usable: the first batch, read on every rank, comes
        # before the run folder is written.
        batches = itertools.chain([next(batches)], batches)
    distributed.barrier(info)

    # -- the run folder: written from here on (by the main rank)
    if info.is_main:
        _check_writable(plan.run_dir)
        remove_temp_files(plan.run_dir)  # left by a kill mid-write; before this run writes any of its own
    local_log_dir = plan.run_dir if is_local(store.fs) else str(Path(".cloob-logs") / plan.run_name)
    # metrics.jsonl and the tracking backends of train.report_to (cloob.train.tracking), main rank only
    run.logger = MetricsLogger(local_log_dir, resume_step=progress.step, report_to=recipe.train.report_to,
                               run_name=plan.run_name, config=recipe.model_dump(mode="json")) if info.is_main else None
    if info.is_main:
        _write_recipe(recipe, plan.run_dir)
    bar = _progress_bar(plan.total_steps, progress.step, enabled=info.is_main and cfg.progress)

    # -- the loop
    last_ckpt, metrics, rate = resume_from, {}, _Rate(progress.samples_seen)
    nonfinite = NonfiniteSteps(cfg.max_nonfinite_steps, progress.nonfinite_skipped)
    preemption.running()  # SIGTERM from now on: stop after the step, with its checkpoint
    while progress.step < plan.total_steps:
        # -- one step: the batch, forward, loss over the global batch, backward, optimizer
        progress.start_epoch(plan.steps_per_epoch)
        epoch = progress.step // plan.steps_per_epoch
        batch = _next_batch(batches, progress.step, epoch)
        images = batch["image"].to(info.device, non_blocking=True)
        texts = batch["text"].to(info.device, non_blocking=True)
        lr = set_lr(run.optimizer, recipe.optim.lr, lr_factor(progress.step, plan.total_steps, recipe.schedule))
        with _autocast(info.device, cfg.precision):
            image_features, text_features, inv_tau = run.forward(images, texts)
            # loss: what this rank back-propagates; loss_value: the global batch's loss (cloob/train/global_loss.py)
            loss, loss_value = run.loss_fn(image_features, text_features, inv_tau)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)  # the true gradients, for the check below (scaler.step would unscale here)
        if recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        # Every rank: stop after this step? skip it as non-finite? (cloob.train.boundary)
        stop, skip = agree(info, preemption.requested(), nonfinite_flag(loss_value, model.parameters(), run.scaler))
        if skip:
            nonfinite.skip(progress.step + 1, run.scaler, last_ckpt.url if last_ckpt else None)
        else:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            if recipe.model.learn_inv_tau:
                clamp_inv_tau_(model)
        progress.advance(batch, plan.global_batch, nonfinite.skipped)

        # -- logging: metrics.jsonl, TensorBoard, the progress bar
        last = progress.step == plan.total_steps
        if progress.step % cfg.log_every == 0 or last or progress.step == 1:
            metrics = _log_step(run, progress, loss_value, lr, epoch, rate)
        _update_bar(bar, metrics)
        # -- checkpoint; on SIGTERM also one of this step, then every rank leaves (cloob.train.preemption)
        if progress.step % cfg.checkpoint_every == 0 or last or stop:
            with writing_checkpoint(progress.step, last_ckpt, run_dir=plan.run_dir, data=recipe.data.train):
                last_ckpt = save(run, progress, metrics, "final" if last else "stopped" if stop else "scheduled")
        if stop and not last:
            reports.beat("done", progress.step)
            raise preemption.Preempted(stop, progress.step, last_ckpt.url)

    # -- the end: workers stopped, logs closed, the summary
    preemption.stopped()
    _stop_workers(batch_iter)
    del batches
    reports.beat("done", progress.step)
    return _finish(run, progress, bar, last_ckpt, metrics)


def _make_model(recipe: Recipe, info: distributed.DistInfo, warm_start: bool):
    """(model, train transform, tokenizer): the same initial weights on every rank, or a warm start's."""
    cfg = recipe.train
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model, train_tf, _, tokenizer = create_model(recipe.model.arch, recipe.model.inv_tau,
                                                 recipe.model.learn_inv_tau, device=info.device)
    if recipe.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.init_from and not cfg.init_checkpoint:
        raise CloobError(f"train.init_from={cfg.init_from} is not resolved (the launcher resolves it to a checkpoint "
                         "and its sha256)", "start the run with `cloob train` (or the flows), or pass "
                         "train.init_checkpoint=<checkpoint folder> and train.init_sha256=<its model_sha256> "
                         "with it")
    if warm_start and cfg.init_checkpoint:
        # A warm start: the parent's weights only; the optimizer, schedule and step start afresh. Every
        # rank reads the same file, checked against its sha256.
        model.load_state_dict(load_init_weights(cfg.init_checkpoint, cfg.init_sha256, recipe.model.arch,
                                                map_location=info.device))
    if recipe.data.decoder == "torchvision":  # the same crops at about half the CPU (bench/bench_decode.py)
        train_tf = TensorTrainTransform.of(train_tf)
    return model, train_tf, tokenizer


def _batch_iter(run: Run, progress: Progress, train_tf, tokenizer):
    """The DataLoader's iterator over this rank's batches, from where progress stands."""
    recipe, plan, info, cfg = run.recipe, run.plan, run.info, run.recipe.train
    dataset = ShardStream(plan.shard_urls, batch_size=cfg.batch_size, image_transform=train_tf,
                          tokenizer=tokenizer, seed=cfg.seed, resampled=recipe.data.resampled,
                          shuffle_buffer=recipe.data.shuffle_buffer, rank=info.rank, world_size=info.world_size,
                          expected_counts={u: c for u, c in zip(plan.shard_urls, plan.shard_counts) if c},
                          exclude_keys=plan.exclude_keys)
    # Resumed from a checkpoint saved on an epoch's last step: its stream positions are the finished
    # epoch's. Fold them away as the loop does at every epoch start, or the workers would skip that
    # many batches into the new epoch and land in the next one.
    progress.start_epoch(plan.steps_per_epoch)
    dataset.start_epoch(progress.step // plan.steps_per_epoch, progress.stream, plan.steps_per_epoch)
    loader = DataLoader(ReportErrors(dataset, run_dir=plan.run_dir, data=recipe.data.train), batch_size=None,
                        num_workers=recipe.data.workers, worker_init_fn=preemption.worker_init,
                        pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
                        timeout=LOADER_TIMEOUT_S if recipe.data.workers else 0)
    return iter(loader)


def _next_batch(batches, step: int, epoch: int) -> dict:
    reports.beat("data", step)
    batch = next(batches)
    reports.beat("step", step)
    if batch["epoch"] != epoch:  # the workers' epoch bookkeeping must agree with the step count
        raise RuntimeError(f"data stream is in epoch {batch['epoch']} at step {step} (epoch {epoch})")
    return batch


class _Rate:
    """Samples per second since the last call (or the start)."""

    def __init__(self, samples: int):
        self.time, self.samples = time.perf_counter(), samples

    def __call__(self, samples: int) -> float:
        now = time.perf_counter()
        rate = (samples - self.samples) / max(now - self.time, 1e-9)
        self.time, self.samples = now, samples
        return rate


def _log_step(run: Run, progress: Progress, loss_value: torch.Tensor, lr: float, epoch: int, rate: _Rate) -> dict:
    """The step's metrics (over all ranks), written to metrics.jsonl and TensorBoard by the main rank."""
    samples_per_s = rate(progress.samples_seen)
    skips, read_retries = _global_skips(progress, run.info)
    metrics = {"loss": loss_value.item(), "lr": lr, "inv_tau": run.model.logit_scale.exp().item(),
               "samples_per_s": samples_per_s, "epoch": epoch, "skipped": sum(skips.values()),
               **{f"skipped_{k}": v for k, v in skips.items()}, "read_retries": read_retries,
               "nonfinite_skipped": progress.nonfinite_skipped}
    if run.logger:
        run.logger.log(progress.step, metrics, total_steps=run.plan.total_steps)
    return metrics


def _update_bar(bar, metrics: dict) -> None:
    if bar is not None:
        bar.update(1)
        if metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            inv_tau=f"{metrics['inv_tau']:.1f}", sps=f"{metrics['samples_per_s']:.0f}",
                            skipped=metrics["skipped"], refresh=False)


def _finish(run: Run, progress: Progress, bar, last_ckpt, metrics: dict) -> dict:
    """Close the bar and the logs; the summary, and the final line on the main rank."""
    if bar is not None:
        bar.close()
    if run.logger:
        run.logger.close()
    summary = {"run_dir": run.plan.run_dir, "checkpoint": last_ckpt.url if last_ckpt else None,
               "step": progress.step, "metrics": metrics}
    if run.info.is_main:
        print(f"done: {progress.step} steps; checkpoint: {summary['checkpoint']}{_data_note(metrics)}",
              file=sys.stderr)
    return summary


def _global_skips(progress: Progress, info: distributed.DistInfo) -> tuple[dict[str, int], int]:
    """(skipped samples and shards by reason, shard reads reopened), over the run and all ranks."""
    local = progress.stream.skip_totals()
    values = torch.tensor([local[k] + progress.skips_before_epoch[k] for k in SKIP_REASONS]
                          + [progress.stream.retry_total() + progress.retries_before_epoch], dtype=torch.int64)
    if info.distributed:
        values = values.to(info.device)
        torch.distributed.all_reduce(values)
    *skips, retries = values.tolist()
    return dict(zip(SKIP_REASONS, skips)), retries


_SKIP_WORDS = {"bad_shard": "unreadable shard(s)", "corrupt_image": "corrupt image(s)",
               "missing_caption": "sample(s) without caption"}


def _data_note(metrics: dict) -> str:
    """What the data cost the run, for the final line: skipped shards and samples, reopened reads."""
    parts = [f"{metrics[f'skipped_{k}']} {_SKIP_WORDS[k]}" for k in SKIP_REASONS if metrics.get(f"skipped_{k}")]
    note = f"; skipped {', '.join(parts)}" if parts else ""
    if metrics.get("read_retries"):
        note += f"; {metrics['read_retries']} shard read(s) reopened after a dropped connection"
    return note


def _write_recipe(recipe: Recipe, run_dir: str) -> None:
    import yaml

    Location(run_dir).write_bytes("recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).encode())


def _announce(run: Run, resume_from) -> None:
    recipe, plan, info = run.recipe, run.plan, run.info
    where = f"resuming from step {resume_from.step}" if resume_from else "starting"
    print(f"cloob train: {recipe.loss.method} / {recipe.model.arch} on {plan.num_samples} samples in "
          f"{len(plan.shard_urls)} shards; {info.world_size} x {recipe.train.batch_size} = global batch "
          f"{plan.global_batch}; {plan.total_steps} steps ({plan.steps_per_epoch}/epoch) on "
          f"{info.device.type}; {where}\n  loss: {run.loss_fn.plan.describe(info.world_size)}\n  run: {plan.run_dir}",
          file=sys.stderr)
    cfg = recipe.train
    if recipe.data.content_hash:
        print(f"  data: {recipe.data.version or recipe.data.train} (content hash {recipe.data.content_hash[:12]})",
              file=sys.stderr)
    if cfg.init_sha256 and not resume_from:
        print(f"  warm start from {cfg.init_from} ({(cfg.init_entry or cfg.init_sha256)[:12]}): its weights, a fresh "
              "optimizer and schedule", file=sys.stderr)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m cloob.train <recipe> [section.field=value ...]`, also under torchrun."""
    import argparse

    parser = argparse.ArgumentParser(prog="cloob.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML file or shipped recipe name (cloob recipes)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank: torchrun's death must end it (see cloob.run.lifeline)
        from cloob.run.lifeline import die_with_parent

        die_with_parent(signal.SIGKILL)
    logging.basicConfig(level=os.environ.get("CLOOB_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncio").addFilter(QuietStorageTasks())
    # Under cloob.run.launch a failure is reported once, as data, for the launcher to tell the user;
    # every rank printing it (and torchrun's report after it) is what a user would see otherwise.
    try:
        train(load_recipe(args.recipe, args.overrides))
    except preemption.Preempted as p:
        if os.environ.get("RANK", "0") == "0" and not reports.write_preempted(p.signum, p.step, p.checkpoint):
            print(p.message(), file=sys.stderr)  # no launcher to tell it
        return 128 + p.signum
    except CloobError as e:
        if not reports.write_error("cloob", e.problem, e.fix, type_name=type(e).__name__):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A collective failing on this rank is mostly the end of another rank, which reports the cause;
        # so is any failure after SIGTERM: torchrun stops the others so when one rank has died.
        kind = "peer" if isinstance(e, torch.distributed.DistError) or preemption.requested() else "internal"
        if not reports.write_error(kind, f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                                   type_name=type(e).__name__, traceback=traceback.format_exc()):
            raise
        return 1
    return 0

