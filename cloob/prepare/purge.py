"""`cloob prepare --purge-removed`: deleting from the shards, for good, the samples of rows that a
dataset's newest version no longer has (taken down at their source), and bringing every version's
JSON level with what is left (cloob.prepare.versions keeps them out of training until then)."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cloob.prepare.folder import META, staged, write_json
from cloob.prepare.identity import write_parquet
from cloob.prepare.manifest import finished_shards
from cloob.prepare.versions import VERSIONS, latest_version, timestamp
from cloob.storage import Location


def purge_removed(out: str, progress: bool = False) -> dict:
    """Delete from the shards, for good, the samples of rows that the newest version no longer has
    (taken down at the source). Each shard that holds any is rewritten without them (tar, then its
    parquet, where their status becomes "purged", then its stats file), and every version's JSON
    has its shard entries, counts and excluded keys brought level and the purge recorded under
    `purged`; a version's content_hash stays, naming the version as it was prepared. Versions that
    left the rows out read exactly what they read before; earlier ones read the rest of their
    samples. Safe to rerun after a kill: a shard holding none of them is left as it is."""
    from tqdm import tqdm

    from cloob.lock import folder_lock

    store = Location(out)
    with folder_lock(store.url(META), purpose="cloob prepare --purge-removed", alternative="wait for it to end",
                     label=store.url()):
        newest = latest_version(store)
        if newest is None:
            return {"samples": 0, "shards": 0, "rows": 0}
        removed = pa.array(newest.get("removed_row_ids") or [], pa.int64())
        shards = finished_shards(store)
        parts = []
        for stem in shards.values():  # the rows' samples, purged already by a killed run or not
            with store.open(f"{stem}.parquet", "rb") as f:
                t = pq.read_table(f, columns=["row_id", "key", "status"])
            parts.append(t.filter(pc.and_(pc.is_in(t["row_id"], value_set=removed),
                                          pc.is_in(t["status"], value_set=pa.array(["success", "purged"])))))
        gone = pa.concat_tables(parts) if parts else pa.table({"row_id": pa.array([], pa.int64()),
                                                               "key": pa.array([], pa.string())})
        keys = set(gone["key"].to_pylist())
        touched: dict[str, int] = {}
        for stem in tqdm(shards.values(), desc="purging", unit="shard", disable=not progress, leave=False):
            n = _purge_shard(store, stem, keys)
            if n:
                touched[f"{stem}.tar"] = n
        # Every version's shard entries against the stats files (also those a killed purge left behind).
        _purge_versions(store, keys, shards, sorted(set(gone["row_id"].to_pylist())))
        if not touched:
            return {"samples": 0, "shards": 0, "rows": 0}
        return {"samples": sum(touched.values()), "shards": len(touched),
                "rows": len(set(gone["row_id"].to_pylist()))}


def _purge_shard(store: Location, stem: str, keys: set[str]) -> int:
    """Rewrite shard `stem` without the samples `keys` (tar, then parquet, then stats); how many samples
    it lost (0: untouched). A shard that a killed purge left with a stale stats file is levelled."""
    import io
    import tarfile

    with store.open(f"{stem}.parquet", "rb") as f:
        table = pq.read_table(f)
    hit = pc.and_(pc.is_in(table["key"], value_set=pa.array(sorted(keys), pa.string())),
                  pc.equal(table["status"], "success"))
    n = int(pc.sum(hit).as_py() or 0)
    if n:
        with staged(store, f"{stem}.tar", ".tmp-purge-") as tmp, store.open(f"{stem}.tar", "rb") as src, \
                tarfile.open(fileobj=src, mode="r|") as tin, tarfile.open(tmp, "w") as tout:
            for member in tin:
                if member.name.rsplit(".", 1)[0] in keys:
                    continue
                data = tin.extractfile(member).read() if member.isfile() else None
                tout.addfile(member, io.BytesIO(data) if data is not None else None)
        status = pc.if_else(hit, "purged", table["status"])
        message = pc.if_else(hit, "removed from the source; purged", table["error_message"])
        table = table.set_column(table.schema.get_field_index("status"), "status", status)
        table = table.set_column(table.schema.get_field_index("error_message"), "error_message", message)
        write_parquet(store, f"{stem}.parquet", table)
    return _level_stats(store, stem, int(pc.sum(pc.equal(table["status"], "success")).as_py() or 0))


def _level_stats(store: Location, stem: str, successes: int) -> int:
    """Set the shard's stats file to `successes` (written last, as img2dataset does); how many fewer."""
    import json

    stats = json.loads(store.read_bytes(f"{stem}_stats.json"))
    fewer = int(stats["successes"]) - successes
    if fewer:
        stats["successes"] = successes
        store.write_bytes(f"{stem}_stats.json", json.dumps(stats, indent=4).encode())
    return fewer


def _purge_versions(store: Location, keys: set[str], shards: dict[int, str], row_ids: list[int]) -> None:
    """Bring every version's shard entries level with the shards' stats files after a purge."""
    import json

    from cloob.prepare.manifest import _cached_digest

    now = {f"{stem}.tar": int(json.loads(store.read_bytes(f"{stem}_stats.json"))["successes"])
           for stem in shards.values()}
    digests: dict[str, dict] = {}
    record = {"at": timestamp(), "row_ids": row_ids, "samples": len(keys)}
    names = sorted(store.glob(f"{VERSIONS}/v*.json"))
    targets = [f"{VERSIONS}/{posixpath.basename(n)}" for n in names] + [f"{META}/manifest.json"]
    for rel in targets:
        v = store.read_json(rel)
        if v is None:
            continue
        dropped = 0
        for e in v["shards"]:
            ok = now.get(e["shard"])
            if ok is not None and ok != int(e["successes"]):
                if e["shard"] not in digests:
                    digests[e["shard"]] = _cached_digest(store, META, e["shard"][:-4])
                d = digests[e["shard"]]
                dropped += int(e["successes"]) - ok
                e.update({"successes": ok, "samples": d["samples"], "bytes": d["bytes"], "sha256": d["sha256"],
                          "content_sha256": d["content_sha256"]})
        if not dropped:
            continue
        excluded = v.get("excluded_keys")
        if excluded is not None:
            was = len(excluded)
            v["excluded_keys"] = [k for k in excluded if k not in keys]
            still_in = dropped - (was - len(v["excluded_keys"]))  # samples this version read until now
        else:
            still_in = dropped
        t = v["totals"]
        t["samples"] -= still_in
        t["successes"] -= still_in
        t["bytes"] = sum(e["bytes"] for e in v["shards"])
        v["purged"] = [*v.get("purged", []), record]
        write_json(store, rel, v)
