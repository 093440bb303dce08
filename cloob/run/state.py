"""What is already done, judged by content: each function returns a key naming a finished step's
output (hashes of what it was made from and of what it made), or None when the step still has work.

The orchestration layer caches on these keys: a finished step is skipped, and a missing or partial
output (deleted, crashed, another spec) gives None, so the step runs and resumes from what is there.
A key is never built from arguments alone.
"""

from __future__ import annotations

import hashlib
import json


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prepared(spec, out: str) -> str | None:
    """A pretraining dataset at `out` made from `spec` (a PretrainSpec) whose manifest is written."""
    from cloob.prepare.run import read_manifest

    m = read_manifest(out)
    if not m or m.get("spec_hash") != spec.content_hash():
        return None
    return _key("prepared", m["spec_hash"], m["content_hash"])


def trained(recipe) -> str | None:
    """The run of `recipe` has a checkpoint at its last step, saved by this very recipe.

    The run's length is read from the checkpoint (meta.json's total_steps, what the trainer planned),
    so this lists no shards; only a checkpoint from before total_steps was recorded is planned anew."""
    from cloob.train.checkpoint import CheckpointStore

    latest = CheckpointStore(recipe.run_dir()).latest()
    if latest is None:
        return None
    meta = latest.meta()
    if meta.get("recipe_hash") != recipe.content_hash():
        return None
    total = meta.get("total_steps") or _planned_steps(recipe, meta)
    if latest.step < total:
        return None
    return _key("trained", meta["recipe_hash"], meta["model_sha256"], latest.step)


def _planned_steps(recipe, meta) -> int:
    if recipe.train.steps:
        return recipe.train.steps
    import math

    from cloob.train import plan_run

    # The plan depends on the world size (steps per epoch); the run records the one it trained with.
    plan = plan_run(recipe, world_size=1)
    ws = int(meta.get("world_size") or 1)
    steps_per_epoch = plan.num_samples // (recipe.train.batch_size * ws)
    return max(1, math.ceil(recipe.train.epochs * steps_per_epoch))

# Whether a (checkpoint, set) pair is already evaluated: cloob.evaluate.runner.previous_row, used by
# `cloob evaluate` and the flow's evaluate task alike.
