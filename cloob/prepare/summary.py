"""What a preparation tells its user at the end (`cloob prepare`): rows, images, shards and bytes, this
run's download rounds, failures by reason, the manifest and its version, and how to train on it."""

from __future__ import annotations

from cloob.safetext import safe_text


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _shards_of(r: dict) -> str:
    """' (2 of 8 shards; 6 were already there)' for a resumed download round, else ''."""
    if not r.get("shards_kept"):
        return ""
    return f" ({r['shards']} of {r['shards'] + r['shards_kept']} shards; {r['shards_kept']} were already there)"


def print_summary(m: dict, out: str) -> None:
    """What `cloob prepare` prints at the end, from the manifest `m` of the dataset at `out`."""
    t, run = m["totals"], m["run"]
    print(f"{m['name']}: {t['rows']} rows -> {t['successes']} images in {t['shards']} shards "
          f"({human_bytes(t['bytes'])}) at {out}  [{100 * t['success_rate']:.1f}% success]")
    if run["noop"]:
        print(f"  {run.get('message') or 'nothing to do: every shard was already finished'} ({run['seconds']:.1f} s)")
    else:
        rate = sum(r["rows"] for r in run["rounds"]) / max(sum(r["seconds"] for r in run["rounds"]), 1e-9)
        rounds = ", ".join(f"{r['mode']} {r['rows']} rows{_shards_of(r)} in {r['seconds']:.1f} s"
                           for r in run["rounds"])
        print(f"  this run: {run['seconds']:.1f} s ({rounds or 'no download needed'}"
              f"{f'; {rate:.0f} rows/s' if run['rounds'] else ''})")
        if run.get("message"):
            print(f"  {run['message']}")
    skipped = {k: m["rows"][k] for k in ("invalid_url", "empty_caption") if m["rows"].get(k)}
    if skipped:
        print("  source rows left out: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items()))
    if t["failures_by_reason"]:
        print(f"  failures by reason ({t['failures']}):")
        for reason, n in list(t["failures_by_reason"].items())[:10]:
            print(f"    {n:8d}  {safe_text(reason)}")  # escaped again: a manifest from before reason_of escaped
        print("  retry them with --retry-failed")
    print(f"  manifest: {out.rstrip('/')}/_cloob/manifest.json (content hash {m['content_hash'][:12]})")
    if m.get("version"):
        print(f"  version {m['version']}: {out.rstrip('/')}/_cloob/versions/v{m['version']}.json (the newest, "
              f"the default); an earlier one: data.train={out.rstrip('/')}@v1")
        if m.get("excluded_keys"):
            print(f"  {len(m['excluded_keys'])} samples of rows removed from the source are skipped in training; "
                  f"delete them from the shards with: cloob prepare <spec> --out {out} --purge-removed")
    print(f"  train on it: cloob train <recipe> data.train={out}")
