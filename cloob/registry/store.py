"""Checkpoint registry on a folder or an object store, safe with several writers at once.

Layout under `<store>/registry/`:
    entries/<sha256>.json                 one per checkpoint, named by its model file's sha256 (its
                                          content identity), so registering twice is a no-op (no new
                                          entry, `latest` stays) and two writers of the same checkpoint
                                          write the same file
    aliases/<alias>/<time>-<uuid>.json    an alias is a log of moves; its target is the newest move

Every file is written once and never rewritten in place (through cloob.storage.Location: an atomic
rename locally, one PUT on S3), and every listing is read afresh, so no writer can lose another's
entry or move, and a reader sees an alias either before or after a move, never half of one. A
checkpoint is registered only when every file matches its digest in meta.json. Aliases: `latest`
follows the newest registration; `best-<dataset>` the entry with the best main metric on that
dataset (`update_best`); `champion` and `challenger` move only by promotion (promotion.py), each
move carrying its decision; any other name is the user's.

An entry holds the lineage: checkpoint URI and sha256, run id, step, method, arch, the recipe and
its hash, the training data and its manifest hash, code version and the training metrics. Its
evaluation rows are read from the results table when shown, so they appear once they exist.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cloob.errors import CloobError
from cloob.names import PLAIN_NAME, check_name
from cloob.registry.lineage import pretraining_data, read_recipe, resolve_checkpoint, run_lineage
from cloob.storage import Location, redact

ALIAS = PLAIN_NAME  # an alias is a folder: cloob.names
_SHA = re.compile(r"^[0-9a-f]{6,64}$")


class RegistryError(CloobError):
    pass


@dataclass
class Registration:
    entry: dict
    new: bool  # False: the checkpoint was registered before, and nothing was written for `latest`
    moved: list[str] = field(default_factory=list)  # the aliases that moved to it


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Registry:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.loc = Location(self.uri)

    # ------------------------------------------------------------------------------- files
    # The byte form of both kinds of file is fixed: entries json.dumps(entry, indent=1, sort_keys=True),
    # alias moves json.dumps(move) (tests/test_registry.py checks both).
    @staticmethod
    def _entry_path(entry_id: str) -> str:
        return f"entries/{entry_id}.json"

    def _json_names(self, rel: str) -> list[str]:
        """The .json files directly under rel, sorted (hidden ones, writes in progress, left out)."""
        return [n for n in self.loc.list(rel, kind="file") if n.endswith(".json")]

    # ----------------------------------------------------------------------------- entries
    def register(self, ref: str, *, aliases: list[str] | tuple[str, ...] = (), note: str | None = None) -> dict:
        """Register a checkpoint (folder, or a run's latest) and move `latest` and `aliases` to it; the entry."""
        return self.add(ref, aliases=aliases, note=note).entry

    def add(self, ref: str, *, aliases: list[str] | tuple[str, ...] = (), note: str | None = None) -> Registration:
        """register(), saying what changed. A new checkpoint is checked file by file against its meta.json,
        then gets its entry, and `latest` and `aliases` move to it. A registered one changes nothing, except
        that an alias named in `aliases` that points elsewhere moves to it."""
        from cloob.train.checkpoint import read_meta, verify_files

        for a in aliases:
            self.check_alias(a)
        url = resolve_checkpoint(ref)
        meta = read_meta(url)
        if "model_sha256" not in meta:
            raise RegistryError(f"{redact(url)}: meta.json has no model_sha256",
                                "register a complete checkpoint written by `cloob train`")
        entry_id = meta["model_sha256"]
        entry = self.loc.read_json(self._entry_path(entry_id))
        if entry is not None:
            verify_files(url, meta, hashed=set())  # registered before (and hashed then): missing or truncated?
            current = self.aliases()
            moved = [a for a in dict.fromkeys(aliases) if current.get(a) != entry_id]
            for a in moved:
                self.set_alias(a, entry_id)
            return Registration(entry, new=False, moved=moved)
        verify_files(url, meta)  # every file, hashed: the entry vouches for the whole checkpoint
        run_dir = posixpath.dirname(posixpath.dirname(url.rstrip("/")))
        source = meta.get("source")  # weights imported from another codebase (cloob import): no run folder
        recipe = None if source else read_recipe(run_dir)
        data_name, data_hash = (meta.get("pretraining_data"), None) if source else pretraining_data(run_dir)
        entry = {"id": entry_id, "checkpoint_uri": redact(url), "checkpoint_sha256": entry_id,
                 "model_bytes": meta.get("model_bytes"), "run_id": meta.get("run_name"),
                 "run_dir": redact(run_dir), "step": meta.get("step"), "method": meta.get("method"),
                 "arch": meta.get("arch"), "recipe_name": meta.get("recipe_name"),
                 "recipe_hash": meta.get("recipe_hash"), "recipe": recipe,
                 "data": redact(((recipe or {}).get("data") or {}).get("train") or "") or None,
                 "data_name": data_name, "data_manifest_hash": data_hash,
                 "samples_seen": meta.get("samples_seen"), "code_version": meta.get("code_version"),
                 "training_metrics": meta.get("metrics") or {}, "note": note, "registered_at": _now(),
                 **run_lineage(meta, recipe)}
        if source:
            entry.update(source=source, run_dir=None)  # provenance: the file's name, sha256, ...
        self.loc.write_json(self._entry_path(entry_id), entry, indent=1, sort_keys=True)
        moved = list(dict.fromkeys(("latest", *aliases)))
        for a in moved:
            self.set_alias(a, entry_id)
        return Registration(entry, new=True, moved=moved)

    def entries(self) -> list[dict]:
        out = [e for n in self._json_names("entries") if (e := self.loc.read_json(f"entries/{n}")) is not None]
        return sorted(out, key=lambda e: e["registered_at"])

    def get(self, entry_id: str) -> dict | None:
        return self.loc.read_json(self._entry_path(entry_id))

    # ----------------------------------------------------------------------------- aliases
    @staticmethod
    def check_alias(alias: str) -> None:
        """RegistryError unless `alias` can name an alias: a plain name (cloob.names), not an entry id."""
        try:
            check_name(alias, "alias")  # aliases/<alias>/ in the registry
        except CloobError as e:
            raise RegistryError(e.problem, e.fix) from None
        if _SHA.match(alias):
            raise RegistryError(f"alias {alias!r} is a hex string, as entry ids are",
                                "use a name with a letter other than a-f in it")

    def set_alias(self, alias: str, entry_id: str, *, reason: str | None = None, decision: dict | None = None) -> dict:
        """Move `alias` to the entry: one new, atomically written move event. `decision`: a promotion's
        record (cloob/registry/promotion.py), kept in the move."""
        self.check_alias(alias)
        if self.get(entry_id) is None:
            raise RegistryError(f"no registry entry {entry_id}", "register the checkpoint first: cloob registry register <ckpt>")
        t = datetime.now(UTC)
        move = {"alias": alias, "entry": entry_id, "at": t.isoformat(timespec="microseconds"), "reason": reason}
        if decision is not None:
            move["decision"] = decision
        name = f"{t:%Y%m%dT%H%M%S.%f}-{uuid.uuid4().hex}.json"
        self.loc.write_json(f"aliases/{alias}/{name}", move)
        return move

    def alias_history(self, alias: str) -> list[dict]:
        moves = [m for n in self._json_names(f"aliases/{alias}")
                 if (m := self.loc.read_json(f"aliases/{alias}/{n}")) is not None]
        return sorted(moves, key=lambda m: (m["at"], m["entry"]))

    def aliases(self) -> dict[str, str]:
        out = {}
        for alias in self.loc.list("aliases", kind="directory"):
            history = self.alias_history(alias)
            if history:
                out[history[-1]["alias"]] = history[-1]["entry"]
        return out

    # ----------------------------------------------------------------------------- lookup
    def resolve(self, name: str) -> dict:
        """An entry by alias, by id (a unique prefix of at least 6 hex digits), or by checkpoint URI."""
        history = self.alias_history(name) if ALIAS.match(name) else []
        if history:
            return self.get(history[-1]["entry"])
        entries = self.entries()
        if _SHA.match(name):
            hits = [e for e in entries if e["id"].startswith(name)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise RegistryError(f"{name!r} matches {len(hits)} entries", "give more digits of the id")
        hits = [e for e in entries if e["checkpoint_uri"].rstrip("/") == name.rstrip("/")]
        if hits:
            return hits[-1]
        known = ", ".join(sorted(self.aliases())) or "none"
        raise RegistryError(f"nothing in the registry {self.uri} is called {name!r}",
                            f"use an alias ({known}), an entry id, or a registered checkpoint URI; "
                            "`cloob registry list` shows them")

    def update_best(self, results_uri: str) -> dict[str, str]:
        """Move `best-<dataset>` to the registered entry with the best main metric on each dataset.
        Returns the aliases that moved."""
        from cloob.results.table import read_rows

        registered = {e["id"] for e in self.entries()}
        best: dict[str, tuple[float, str]] = {}
        for r in read_rows(results_uri, latest=True).to_pylist():
            if r["checkpoint_id"] in registered and r["main_value"] is not None:
                if r["dataset"] not in best or r["main_value"] > best[r["dataset"]][0]:
                    best[r["dataset"]] = (r["main_value"], r["checkpoint_id"])
        current = self.aliases()
        moved = {}
        for dataset, (value, entry_id) in sorted(best.items()):
            alias = f"best-{dataset}"
            if ALIAS.match(alias) and current.get(alias) != entry_id:
                self.set_alias(alias, entry_id, reason=f"main metric {value:.4f} on {dataset}")
                moved[alias] = entry_id
        return moved

    def eval_rows(self, entry_id: str, results_uri: str) -> list[dict]:
        from cloob.results.table import read_rows

        return [r for r in read_rows(results_uri, latest=True).to_pylist() if r["checkpoint_id"] == entry_id]
