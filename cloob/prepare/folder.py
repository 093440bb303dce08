"""What a dataset folder may hold, before cloob prepare writes into it: never a folder of other files,
never one holding a dataset of another spec (unless forced, which deletes only what img2dataset and
cloob wrote there), and the record of which spec made it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator

from cloob.errors import CloobError
from cloob.lock import LOCK_NAME
from cloob.prepare.spec import PretrainSpec, SpecChanged
from cloob.safetext import safe_text
from cloob.storage import Location

META = "_cloob"  # our files in a dataset folder, relative to it
OURS = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)$")  # img2dataset's files of a shard
_SHOWN = 8  # entries of a refused folder named in the message


def write_json(store: Location, rel: str, data: dict) -> None:
    """Our JSON files' one byte form (the manifest's and spec.json's bytes must not change)."""
    store.write_json(rel, data, indent=1, sort_keys=True)


class Damaged(CloobError):
    """One of the dataset's own JSON files does not parse (truncated, overwritten): every file is
    written whole, so something outside cloob changed it."""


def read_json(store: Location, rel: str, fix: str) -> dict | None:
    """One of our JSON files, or None if absent; a damaged one is Damaged, naming it, with `fix`."""
    try:
        return store.read_json(rel)
    except ValueError as e:
        raise Damaged(f"{store.url(rel)} is damaged (not valid JSON: {safe_text(str(e))[:120]}); cloob writes it "
                      "whole, so something else changed it", fix) from None


@contextlib.contextmanager
def staged(store: Location, rel: str, prefix: str = ".tmp-") -> Iterator[str]:
    """A local temporary file to write `rel` of the dataset folder into (beside it in _cloob/ on a
    local folder, so the move is a rename): moved to `rel` whole when the block ends without an
    error, deleted in any case."""
    fd, tmp = tempfile.mkstemp(dir=store.path(META) if store.is_local else None, prefix=prefix,
                               suffix=os.path.splitext(rel)[1])
    os.close(fd)
    try:
        yield tmp
        store.move_in(tmp, rel)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def next_retry_file(store: Location) -> str:
    """The next free `_cloob/retry/NNN.parquet`: the url list of the next extend round."""
    n = len(store.glob(f"{META}/retry/*.parquet", hidden=True)) if store.exists(f"{META}/retry") else 0
    return f"{META}/retry/{n:03d}.parquet"


def _names(store: Location) -> list[str]:
    """The top-level entries of `out`, hidden ones too ([] where there is nothing yet)."""
    store.refresh()
    try:
        if store.isfile():
            raise CloobError(f"--out {store.url()} is a file", "give a folder (new or empty) as --out")
        return store.list(hidden=True)
    except (OSError, ValueError) as e:
        raise CloobError(f"cannot list {store.url()}: {type(e).__name__}: {safe_text(e)}",
                         "check the --out URL and its credentials (AWS_* environment or config)") from None


def _listed(names: list[str]) -> str:
    shown = ", ".join(safe_text(n, 60) for n in names[:_SHOWN])
    return f"{shown}, ... ({len(names)} entries)" if len(names) > _SHOWN else f"{shown} ({len(names)} entries)"


def check_folder(store: Location) -> None:
    """Refuse, before anything is written, a folder that cloob prepare did not make, and in one it
    made, top-level *.json files that are not a shard's stats (img2dataset would count them as
    finished shards, or crash on their names)."""
    names = _names(store)
    if not names:
        return
    made_by_us = META in names and store.exists(f"{META}/spec.json")
    if not made_by_us and names != [META]:  # [META] alone: a first run stopped before spec.json
        raise CloobError(
            f"{store.url()} is not empty and was not made by cloob prepare: it holds {_listed(names)}",
            "give a new or empty folder as --out; cloob prepare never writes into a folder of other "
            "files (--force included), so none of them is overwritten")
    stray = [n for n in names if n.endswith(".json") and not OURS.match(n)]
    if stray:
        raise CloobError(
            f"{store.url()} holds top-level JSON files that are not shard stats: {_listed(stray)}; "
            "img2dataset would read them as finished shards",
            "move them out of that folder, then rerun")


def check_owner(store: Location, spec: PretrainSpec, spec_hash: str, force: bool) -> None:
    """Refuse a folder holding another dataset (or, with force, delete that dataset)."""
    try:
        current = store.read_json(f"{META}/spec.json")
    except (OSError, ValueError) as e:
        raise CloobError(f"cannot read {store.url(META)}: {type(e).__name__}: {safe_text(e)}",
                         "check the --out URL and its credentials (AWS_* environment or config)") from None
    if current and current.get("spec_hash") != spec_hash and not force \
            and not _moved_source(store, spec, current):
        changed = spec.differences(current.get("spec") or {})
        raise SpecChanged(
            f"{store.url()} holds dataset {current.get('name')!r} prepared from a different spec "
            f"(hash {current.get('spec_hash', '?')[:12]}, this spec {spec_hash[:12]}; "
            f"{', '.join(changed) or 'fields unknown'})",
            "prepare into a new --out, or pass --force to delete that dataset and start over", changed)
    if force and store.exists():
        _clear(store)


def _moved_source(store: Location, spec: PretrainSpec, current: dict) -> bool:
    """Whether `spec` is the folder's spec but for where its source is (a re-export of the table under
    another name, another bucket), and a version of the dataset is complete: the next version is then
    read from the new place (cloob.prepare.versions). Before that, the rows being fetched came from
    the old place: another one is another dataset, as before."""
    try:
        theirs = PretrainSpec.model_validate(current.get("spec") or {})
    except ValueError:
        return False
    return theirs.content_hash(locations=False) == spec.content_hash(locations=False) \
        and store.exists(f"{META}/manifest.json")


def record_owner(store: Location, spec: PretrainSpec, spec_hash: str) -> None:
    write_json(store, f"{META}/spec.json",
                {"name": spec.name, "spec_hash": spec_hash, "spec": spec.model_dump(mode="json")})


def _clear(store: Location) -> None:
    """Delete what img2dataset and we wrote, and nothing else (and not the lock we hold)."""
    store.refresh()
    for name in store.list(hidden=True):
        if OURS.match(name) or name == "_tmp":
            store.remove(name, recursive=True)
    for name in store.list(META, hidden=True):
        if name != LOCK_NAME:
            store.remove(f"{META}/{name}", recursive=True)
