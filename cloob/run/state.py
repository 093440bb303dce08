"""What is already done, judged by content: each function returns a key naming a finished step's
output (hashes of what it was made from and of what it made), or None when the step still has work.

The orchestration layer caches on these keys: a finished step is skipped, and a missing or partial
output (deleted, crashed, another spec) gives None, so the step runs and resumes from what is there.
A key is never built from arguments alone.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prepared(spec, out: str) -> str | None:
    """A pretraining dataset at `out` made from `spec` (a PretrainSpec) whose manifest is written and
    whose source has not changed since its newest version read it. A source whose files changed (rows
    appended to the table, a new daily dump) is not "already done": preparing reads it again and makes
    a new version of only the new rows. The demo's generated rows are fixed by the spec."""
    from cloob.prepare.run import read_manifest
    from cloob.prepare.versions import fingerprint, source_unchanged

    m = read_manifest(out)
    if not m or m.get("spec_hash") != spec.content_hash():
        return None
    if fingerprint(spec) is not None and not source_unchanged(spec, out):
        return None
    return _key("prepared", m["spec_hash"], m["content_hash"])


@dataclass(frozen=True)
class DataIdentity:
    """What a run's data.train is, by content: the content hash of the data version (its manifest's),
    the dataset's name and version for the run's name, and when that version was written."""
    content_hash: str
    name: str
    version: str | None = None
    updated_at: str | None = None

    @property
    def label(self) -> str:
        """mytable-v2, or mytable where the data has no version number."""
        return f"{self.name}-v{self.version}" if self.version else self.name


def data_identity(data_train: str) -> DataIdentity | None:
    """The identity of the data `data_train` names, or None where it is not known (shards written by
    other tools, several folders, a brace pattern or a glob): those runs keep data.train's place in
    their key, as before. The one place the launcher reads a dataset's identity: the folder's manifest
    (a dataset with one version: version 1), or, for a version (`<folder>@vN`, a version's JSON) and a
    dataset with several, the training reader's own resolution (cloob.data.shards.list_shards, what
    cloob.prepare.versions.resolve wraps), which reads that version's JSON."""
    from cloob.prepare.run import read_manifest

    train = (data_train or "").strip().rstrip("/")
    if not train or any(c in train for c in ",{*?["):
        return None
    folder, content, version = train, None, None
    try:
        named = "@v" in train or "/_cloob/" in train  # a version, by name or by its JSON
        m = None if named else read_manifest(train)
        if not named and m is None:
            return None  # not made by cloob prepare
        if m is not None and "version" not in m:  # one version: the manifest says it all
            content, version = m.get("content_hash"), 1
        else:
            from cloob.data.shards import list_shards, read_version_ref

            # A version: one JSON read, by the training reader's own function, so the key is the
            # content hash of exactly what the ranks will read.
            ref = read_version_ref(train)
            v = list_shards(train)
            folder, content, version = ref.folder if ref else train, v.content_hash, v.version
            m = read_manifest(folder)
    except (OSError, ValueError):
        return None
    if not content:
        return None
    m = m or {}
    name = (m.get("spec") or {}).get("name") or m.get("name") or posixpath.basename(folder)
    if posixpath.basename(folder) == f"{name}-{str(m.get('spec_hash'))[:10]}":
        # A changed spec prepared beside the old dataset (flows/tasks.py prepare_data): its own name, so
        # that the two are not both "<name>-v1" in run names and the registry.
        name = posixpath.basename(folder)
    written = [t for t in (m.get("updated_at"), m.get("created_at")) if t]
    return DataIdentity(content, str(name), None if version is None else str(version), max(written, default=None))


def _q(value: str) -> str:
    """A string as an override's value that YAML reads back as that string (a hash of digits alone
    would be read as a number)."""
    return json.dumps(str(value))


def _keys(overrides: list[str]) -> set[str]:
    return {ov.split("=", 1)[0].strip() for ov in overrides if "=" in ov}


def identify(recipe, overrides: list[str]) -> list[str]:
    """`overrides` plus what keys the run by content, resolved here on the launcher's side (the trainer
    reads no manifest and no registry): data.content_hash and data.version of the data data.train
    names, and train.init_checkpoint/init_sha256/init_entry of train.init_from. Calling it again on its
    own result adds nothing.

    Runs made before the data entered the key keep theirs: where the run folder of the old key (the
    legacy hash and name, cloob.config.Recipe.content_hash) holds a checkpoint of that key saved after
    the data's manifest was last written, the run is that one (train.run_name set to it, no content
    hash), and it resumes or is skipped as before. Data written after it is a new run."""
    from cloob.config import load_recipe

    overrides = list(overrides)
    keys = _keys(overrides)
    r = load_recipe(recipe, overrides)
    extra = _init_overrides(r, keys)
    if "data.content_hash" in keys:
        return [*overrides, *extra]
    ident = data_identity(r.data.train) if r.data.train else None
    if not extra:
        legacy = _legacy_run(r, overrides, keys, ident)
        if legacy is not None:
            return overrides if legacy == r.run_id() else [*overrides, f"train.run_name={_q(legacy)}"]
    if ident is not None:
        extra += [f"data.content_hash={_q(ident.content_hash)}", f"data.version={_q(ident.label)}"]
    return [*overrides, *extra]


def _legacy_run(r, overrides: list[str], keys: set[str], ident: DataIdentity | None) -> str | None:
    """The name of a run made under the old key that this recipe still means, or None."""
    from cloob.config import _differs
    from cloob.train.checkpoint import CheckpointStore

    name = r.run_id() if "train.run_name" in keys else r.default_run_name(_differs(overrides), legacy=True)
    if ident is None and r.content_hash(legacy=True) == r.content_hash():
        return None  # nothing differs from the old key
    latest = CheckpointStore(posixpath.join(r.train.output.rstrip("/"), "runs", name)).latest()
    if latest is None:
        return None
    meta = latest.meta()
    if meta.get("recipe_hash") != r.content_hash(legacy=True):
        return None
    if ident is not None and ident.updated_at and meta.get("time") is not None:
        try:
            written = datetime.fromisoformat(ident.updated_at).timestamp()
        except ValueError:
            written = None
        if written is not None and float(meta["time"]) < written:
            return None  # the data was written after that run saved: it trained on an older version
    return name


def _init_overrides(r, keys: set[str]) -> list[str]:
    """train.init_from resolved: a registry alias or entry id (in <train.output>/registry), or a
    checkpoint (a checkpoint folder or a run folder, local or a URL)."""
    from cloob.errors import CloobError
    from cloob.registry.lineage import resolve_checkpoint
    from cloob.train.checkpoint import read_meta

    ref = r.train.init_from
    if not ref or "train.init_sha256" in keys:
        return []
    entry_id = None
    if "/" in ref or "://" in ref:
        checkpoint = resolve_checkpoint(ref)
    else:
        from cloob.registry import Registry

        registry = posixpath.join(r.train.output.rstrip("/"), "registry")
        try:
            entry = Registry(registry).resolve(ref)
        except CloobError as e:
            raise CloobError(f"train.init_from={ref}: {e.problem}",
                             f"{e.fix}; or give a checkpoint folder or URL; or leave train.init_from unset to "
                             "train from scratch") from None
        entry_id, checkpoint = entry["id"], entry["checkpoint_uri"]
    meta = read_meta(checkpoint)
    sha = meta.get("model_sha256")
    if not sha or (entry_id and sha != entry_id):
        raise CloobError(f"train.init_from={ref}: {checkpoint} is not the checkpoint registered as {entry_id}"
                         if sha else f"train.init_from={ref}: {checkpoint}'s meta.json has no model_sha256",
                         "register the checkpoint again, or name a complete checkpoint written by cloob train")
    return [f"train.init_checkpoint={_q(checkpoint)}", f"train.init_sha256={_q(sha)}",
            f"train.init_entry={_q(entry_id or sha)}"]


def trained(recipe) -> str | None:
    """The run of `recipe` has a checkpoint at its last step, saved by this very recipe.

    The run's length is read from the checkpoint (meta.json's total_steps, what the trainer planned),
    so this lists no shards; only a checkpoint from before total_steps was recorded is planned anew."""
    from cloob.train.checkpoint import CheckpointStore

    latest = CheckpointStore(recipe.run_dir()).latest()
    if latest is None:
        return None
    meta = latest.meta()
    if meta.get("recipe_hash") not in recipe.run_keys():
        return None
    total = meta.get("total_steps") or _planned_steps(recipe, meta)
    if latest.step < total:
        return None
    return _key("trained", meta["recipe_hash"], meta["model_sha256"], latest.step)


def no_champion_yet(init_from: str | None, registry: str) -> bool:
    """init_from names `champion` and the registry has none yet: a retrain's first run, which trains
    from scratch (its model becomes the first champion) instead of failing for want of one. Any other
    name that is missing stays an error (a typo must not silently train from scratch)."""
    if init_from != "champion":
        return False
    from cloob.registry import Registry

    return "champion" not in Registry(registry).aliases()


def warm_start_of_itself(recipe) -> tuple[str, str] | None:
    """(run folder, checkpoint) of the warm start's parent when the parent is this recipe's own run on
    this same data version (the same trajectory fields, data content hash included, whatever its own
    warm start was), else None.

    A scheduled retrain deployed with init_from=champion would otherwise train again every week on
    unchanged data, each run starting from the last: the data did not change, so neither should the
    model. The pipeline skips such a run (flows/tasks.py); `cloob train` with train.init_from given
    by hand still trains, as asked."""
    from cloob.config import Recipe, trajectory_fields
    from cloob.storage import Location

    t = recipe.train
    if not (t.init_checkpoint and recipe.data.content_hash):
        return None
    checkpoint = t.init_checkpoint.rstrip("/")
    run_dir = posixpath.dirname(posixpath.dirname(checkpoint))  # <run>/checkpoints/step_N
    try:
        import yaml

        parent = Recipe.model_validate(yaml.safe_load(Location(run_dir).read_bytes("recipe.yaml")))
    except (OSError, ValueError):
        return None  # not a run of this product's trainer (an imported checkpoint): a warm start as asked
    if trajectory_fields(parent) != trajectory_fields(recipe):
        return None
    return run_dir, checkpoint


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

# Whether a (checkpoint, set) pair is already evaluated: cloob.evaluate.pairs.previous_row, used by
# `cloob evaluate` and the flow's evaluate task alike.
