"""The plan of a training run: data, batch and steps, checked before anything starts or is written.

Light (no torch, no open_clip): the launcher checks a recipe with it before torchrun starts any rank
(`check_before_start`), so that a typo in the architecture, a missing data folder or a batch larger
than the data fails in a fraction of a second; each rank plans again with the same function
(cloob.train.loop).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from cloob.architectures import check_architecture
from cloob.config import Recipe
from cloob.data.remote import read_head
from cloob.data.shards import list_shards
from cloob.errors import CloobError
from cloob.lock import FolderLock, folder_lock
from cloob.safetext import safe_text

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the run will do, derived from the recipe and the data before anything is written."""

    shard_urls: list[str]
    shard_counts: list[int | None]  # samples per shard from its stats file
    num_samples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    run_name: str
    run_dir: str
    # sample keys of rows the data version leaves out (removed from its source): never trained on
    exclude_keys: frozenset[str] = frozenset()


def plan_run(recipe: Recipe, world_size: int) -> Plan:
    check_architecture(recipe.model.arch)
    shards = list_shards(recipe.data.train)
    _check_readable(shards.urls[0])
    num_samples = recipe.data.num_samples or shards.num_samples
    if num_samples is None:
        raise CloobError(f"no *_stats.json next to the shards of {recipe.data.train!r}, so the sample "
                         "count is unknown", "set data.num_samples=<number of samples>")
    global_batch = recipe.train.batch_size * world_size
    if num_samples < global_batch:
        raise CloobError(f"{num_samples} samples are fewer than one global batch ({global_batch})",
                         "lower train.batch_size or add data")
    if not recipe.data.resampled and len(shards.urls) < world_size * max(1, recipe.data.workers):
        raise CloobError(f"{len(shards.urls)} shards cannot be split across {world_size} ranks x "
                         f"{recipe.data.workers} workers", "set data.resampled=true or fewer data.workers")
    steps_per_epoch = num_samples // global_batch
    total = recipe.train.steps or max(1, math.ceil(recipe.train.epochs * steps_per_epoch))
    return Plan(shards.urls, shards.counts, num_samples, global_batch, steps_per_epoch, total, recipe.run_id(),
                recipe.run_dir(), frozenset(shards.exclude_keys or ()))


def _check_readable(url: str) -> None:
    try:
        head = read_head(url, 512)  # the tar header only, not a stream of the whole shard
    except (OSError, ValueError) as e:
        raise CloobError(f"cannot read shard {url}: {type(e).__name__}: {e}",
                         "check the path, permissions and credentials") from None
    if len(head) < 512 or head[257:262] != b"ustar":
        raise CloobError(f"{url} is not a tar file", "point data.train at webdataset (.tar) shards")


def run_lock(recipe: Recipe) -> FolderLock:
    """The run folder's lock, which the main rank holds for the whole run (cloob.lock); the launcher
    only looks at it (check_free) before starting torchrun."""
    return folder_lock(recipe.run_dir(), purpose=f"cloob train {recipe.run_id()}",
                       alternative="pass train.run_name=<another name> to train into another folder")


def check_before_start(recipe: Recipe, world_size: int, *, lock: bool = True) -> None:
    """The ranks' own checks (the plan; with `lock`, the run folder's lock, looked at, not taken),
    for a launcher to make before it starts them: a bad recipe or a run folder in use fails in a
    fraction of a second instead of after every rank has imported torch and open_clip (about 10 s),
    and nothing is written. Only their CloobErrors are raised; anything else (a storage hiccup) is
    left for the ranks to meet and report."""
    try:
        plan_run(recipe, world_size)
        if lock:
            run_lock(recipe).check_free()
    except CloobError:
        raise
    except Exception as e:  # noqa: BLE001 (the ranks meet it again and report it properly)
        log.info("pre-start check skipped: %s: %s", type(e).__name__, safe_text(e, 300))
