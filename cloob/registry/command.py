"""The `cloob registry` command: its options and what each action prints (register, list, show,
resolve, alias, best, promote, history). cloob/cli.py hands the parsed arguments over; the registry
itself is cloob.registry.store, promotion cloob.registry.promotion."""

from __future__ import annotations

import argparse
import os

from cloob.errors import CloobError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cloob registry`."""
    parser.add_argument("action", choices=["register", "list", "show", "resolve", "alias", "best", "promote", "history"])
    parser.add_argument("refs", nargs="*", help="checkpoint/run folders (register), a name (show, resolve), "
                                                "ALIAS ENTRY (alias), challengers (promote, default latest), an alias (history)")
    parser.add_argument("--on", action="append", metavar="SET",
                        help="promote: a set whose main metric decides (repeatable: their mean); default: every set both "
                             "models were evaluated on")
    parser.add_argument("--min-gain", type=float, default=0.0,
                        help="promote: the challenger must beat the champion by more than this fraction (0.01: one point)")
    parser.add_argument("--require-significant", action="store_true",
                        help="promote: also require the paired bootstrap interval's lower end above --min-gain")
    parser.add_argument("--confidence", type=float, default=0.95, help="promote: the interval's level (default 0.95)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="promote: bootstrap replicates (default 2000)")
    parser.add_argument("--again", action="store_true",
                        help="promote: decide a model that was decided before again, against today's champion")
    parser.add_argument("--alias", action="append", help="with register: also move this alias to it (repeatable)")
    parser.add_argument("--note", help="a note kept with the entry or the alias move")
    parser.add_argument("--store", default=".", help="root of registry/ and results/ (default: .)")
    parser.add_argument("--registry", help="registry location (default: <store>/registry)")
    parser.add_argument("--results", help="results table, for show, best and promote (default: <store>/results)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)")


def _data_version(entry: dict) -> str:
    """An entry's data as `cloob registry list` shows it: the version (mytable-v2), else the data's name
    and the first digits of its manifest hash (entries made before versions), else its name."""
    if entry.get("data_version"):
        return entry["data_version"]
    name, digest = entry.get("data_name") or "-", entry.get("data_manifest_hash")
    return f"{name}@{digest[:8]}" if digest else name


def run_command(args: argparse.Namespace) -> int:
    """`cloob registry ACTION`: register, list, show, resolve, alias, best, promote, history."""
    import json
    import posixpath

    from cloob.registry import Registry

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    reg = Registry(args.registry or posixpath.join(args.store, "registry"))
    results = args.results or posixpath.join(args.store, "results")
    if args.action == "register":
        for ref in args.refs:
            r = reg.add(ref, aliases=args.alias or [], note=args.note)
            e = r.entry
            what = "registered" if r.new else "already registered"
            moved = "" if r.new or not r.moved else f"; moved {', '.join(r.moved)}"
            print(f"{what} {e['id'][:12]}  {e['run_id']} step {e['step']}  {e['checkpoint_uri']}{moved}")
        return 0
    if args.action == "alias":
        if len(args.refs) != 2:
            raise CloobError("`cloob registry alias` takes ALIAS ENTRY", "e.g. cloob registry alias prod latest")
        reg.check_alias(args.refs[0])  # the name first: a bad one is refused whatever the entry
        entry = reg.resolve(args.refs[1])
        reg.set_alias(args.refs[0], entry["id"], reason=args.note)
        print(f"{args.refs[0]} -> {entry['id'][:12]} ({entry['run_id']} step {entry['step']})")
        return 0
    if args.action == "promote":
        return _registry_promote(reg, results, args)
    if args.action == "history":
        return _registry_history(reg, args)
    if args.action == "best":
        moved = reg.update_best(results)
        print("\n".join(f"{a} -> {e[:12]}" for a, e in moved.items()) or "no alias moved")
        return 0
    if args.action in ("show", "resolve"):
        if len(args.refs) != 1:
            raise CloobError(f"`cloob registry {args.action}` takes one name", "an alias, an entry id or a checkpoint URI")
        entry = reg.resolve(args.refs[0])
        if args.action == "resolve":
            print(entry["checkpoint_uri"])
            return 0
        aliases = sorted(a for a, e in reg.aliases().items() if e == entry["id"])
        rows = reg.eval_rows(entry["id"], results)
        evals = [{k: r[k] for k in ("dataset", "main_metric", "main_value", "n_images", "n_skipped",
                                    "eval_settings_hash") if k in r} for r in rows]
        decided = sorted(({"alias": m["alias"], "at": m["at"], "reason": m["reason"]}
                          for a in ("champion", "challenger") for m in reg.alias_history(a)
                          if m["entry"] == entry["id"] and m.get("decision")), key=lambda m: m["at"])
        print(json.dumps({**entry, "aliases": aliases, "evaluations": evals, "promotion": decided}, indent=1,
                         default=str))
        return 0
    entries = reg.entries()
    by_entry: dict[str, list[str]] = {}
    for a, e in sorted(reg.aliases().items()):
        by_entry.setdefault(e, []).append(a)
    run_w = max([3, *(len(str(e["run_id"])) for e in entries)])  # whole names: they say recipe and method
    print(f"{'id':12s}  {'run':{run_w}s} {'step':>7s}  {'method':6s} {'arch':16s} {'data version':20s} "
          f"{'parent':12s}  aliases")
    for e in entries:
        print(f"{e['id'][:12]}  {str(e['run_id']):{run_w}s} {str(e['step']):>7s}  {str(e['method']):6s} "
              f"{str(e['arch'])[:16]:16s} {_data_version(e)[:20]:20s} {((e.get('parent') or {}).get('id') or '-')[:12]:12s}"
              f"  {', '.join(by_entry.get(e['id'], []))}")
    print(f"{len(entries)} entries in {reg.uri}")
    return 0


def _registry_promote(reg, results: str, args) -> int:
    from cloob.registry import promotion

    rule = promotion.PromotionRule(promote_on=args.on or [], min_gain=args.min_gain,
                                   require_significant=args.require_significant, confidence=args.confidence,
                                   bootstrap=args.bootstrap)
    for d in promotion.promote(reg, results, args.refs or ["latest"], rule, again=args.again):
        if not d.get("recorded"):
            print(f"{d['challenger']['run_id']}: nothing moved ({d['reason']})")
            continue
        print(promotion.report(d))
        print()
    champion = reg.aliases().get(promotion.CHAMPION)
    print(f"champion -> {champion[:12] if champion else 'none'}")
    return 0


def _registry_history(reg, args) -> int:
    if len(args.refs) != 1:
        raise CloobError("`cloob registry history` takes one alias", "e.g. cloob registry history champion")
    moves = reg.alias_history(args.refs[0])
    if not moves:
        raise CloobError(f"alias {args.refs[0]!r} has never moved in {reg.uri}",
                         "`cloob registry list` shows the aliases")
    for m in moves:
        e = reg.get(m["entry"]) or {}
        reason = m.get("reason") or ""
        if e.get("run_id") and reason.startswith(f"{e['run_id']} "):  # a promotion's reason starts with the run
            reason = reason[len(e["run_id"]) + 1:]
        print(f"{m['at'][:19]}  {m['entry'][:12]}  {str(e.get('run_id'))} step {e.get('step')}"
              + (f"  {reason}" if reason else ""))
        d = m.get("decision")
        if not d or not d.get("sets"):
            continue
        cp = d["champion"]
        print(f"    against {cp['run_id']} ({cp['id'][:12]}); rule: {', '.join(d['rule']['promote_on']) or 'common sets'},"
              f" min_gain {100 * d['rule']['min_gain']:.2f}" + (", significant" if d["rule"]["require_significant"] else ""))
        for s in d["sets"]:
            print(f"    {s['dataset']:16s} {s['main_metric']:22s} {100 * s['challenger']:6.2f} vs {100 * s['champion']:6.2f}"
                  f"  ({100 * s['gain']:+.2f})")
        interval = d.get("interval")
        print(f"    mean {100 * d['challenger_score']:6.2f} vs {100 * d['champion_score']:6.2f}  gain {100 * d['gain']:+.2f}"
              + (f", {d['rule']['confidence']:.0%} interval [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"
                 if interval else f"; {d.get('interval_note')}"))
        if d.get("approval"):
            print(f"    approval: {d['approval'].get('outcome')} {d['approval'].get('comment') or ''}".rstrip())
    return 0
