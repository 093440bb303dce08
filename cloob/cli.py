"""The `cloob` command line's computing commands: train, prepare, evaluate, results, registry, import, listings.
Errors print one message and exit 2. The installed `cloob` is flows.cli, which adds the commands
that run Prefect flows (demo, deploy); this module never imports Prefect."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from cloob.errors import CloobError
from cloob.names import shorten
from cloob.storage_errors import QuietStorageTasks, storage_failure


def _cmd_train(args) -> int:
    # One way to start training, for one process as for many: the supervised process tree of
    # cloob.run.launch (lifelines, signals passed on, step watchdog, one error message).
    from cloob.run.console import train_command

    return train_command(args.recipe, args.overrides, nproc_per_node=args.nproc_per_node,
                         max_restarts=args.max_restarts)


def _cmd_prepare(args) -> int:
    from cloob.prepare.run import prepare
    from cloob.prepare.spec import load_spec

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url  # read by botocore, here and in img2dataset
    overrides = list(args.set or []) + ([f"limit={args.limit}"] if args.limit else [])
    spec = load_spec(args.spec, overrides)
    if args.purge_removed:
        from cloob.prepare.purge import purge_removed

        if args.retry_failed or args.force:
            raise CloobError("--purge-removed goes alone", "run it without --retry-failed or --force")
        done = purge_removed(args.out, progress=not args.no_progress)
        if done["samples"]:
            print(f"{spec.name}: deleted {done['samples']} samples of rows removed from the source from "
                  f"{done['shards']} shards ({done['rows']} rows) at {args.out}")
        else:
            print(f"{spec.name}: no samples of removed rows are left in the shards at {args.out}")
        return 0
    from cloob.prepare.stop import Stopped, stop_on_sigterm

    try:
        with stop_on_sigterm():  # the download and its processes stopped, the lock released (cloob.prepare.stop)
            m = prepare(spec, args.out, input=args.input, retry_failed=args.retry_failed, force=args.force,
                        progress=not args.no_progress, cluster=args.cluster, cluster_flag=args.cluster_flag)
    except Stopped as e:
        print(f"cloob prepare: stopped by {signal.Signals(e.signum).name}; the finished shards in {args.out} are "
              "kept, rerun the same command to resume", file=sys.stderr, flush=True)
        return 128 + e.signum
    from cloob.prepare.summary import print_summary

    print_summary(m, args.out)
    return 0


def _name_values(items: list[str] | None, flag: str, names: list[str], example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise CloobError(f"{flag} {item!r} is not name=value", f"write e.g. {flag} {example}")
        if name not in names:
            raise CloobError(f"{flag} names {name!r}, which is not among the datasets asked for",
                             f"add {name} to the dataset list, or drop the {flag}")
        out[name] = value
    return out


def _cmd_prepare_downstream(args) -> int:
    from cloob.evaluate.sets.prepare import prepare_downstream
    from cloob.evaluate.sets.spec import list_downstream_specs
    from cloob.prepare.summary import human_bytes

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    names = list_downstream_specs() if args.names == ["all"] else args.names
    sources = _name_values(args.source, "--source", names, "imagenet=/data/imagenet/val")
    splits = _name_values(args.split, "--split", names, "flowers102=valid")
    t0, rows, failed = time.monotonic(), [], []
    for name in names:
        try:
            rows.append(prepare_downstream(name, args.out, source=sources.get(name), split=splits.get(name),
                                           force=args.force, progress=not args.no_progress))
        except CloobError as e:
            if len(names) == 1:
                raise
            failed.append((name, e))  # one bad set does not stop the others
            print(f"error: {name}: {e}", file=sys.stderr)
    print(f"{'dataset':14s} {'images':>8s} {'expected':>8s} {'classes':>8s} {'bytes':>10s} {'time':>8s}  location")
    for r in rows:
        note = " (already prepared)" if r["reused"] else ""
        expected = r.get("expected_images") or "-"
        print(f"{r['name']:14s} {r['images']:8d} {expected:>8} {r['classes']:8d} {human_bytes(r['bytes'] or 0):>10s} "
              f"{r['seconds']:7.1f}s  {r['uri']}{note}")
    for r in rows:
        split = r.get("split") or {}
        left = f", {split['left_out']} images of other splits left out" if split.get("left_out") else ""
        print(f"{r['name']}: {r.get('layout')}; {split.get('name', 'test')} split by {split.get('by')}{left}")
        print(f"  pairs: {'; '.join(r.get('pairs') or [])}{' ...' if r['classes'] > len(r.get('pairs') or []) else ''}")
        for w in r.get("warnings") or []:
            print(f"  warning: {w}")
    print(f"{len(rows)} prepared, {len(failed)} failed, {time.monotonic() - t0:.1f} s in all")
    return 2 if failed else 0


def _split_pair(item: str, flag: str, example: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise CloobError(f"{flag} {item!r} is not NAME=URI", f"write e.g. {flag} {example}")
    return name, value


def _eval_sets(args) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    import posixpath

    from cloob.evaluate.targets import prepared_sets

    downstream = args.downstream or posixpath.join(args.store, "downstream")
    classification = prepared_sets(downstream, args.datasets) if args.datasets else []
    classification += [_split_pair(d, "--data", "flowers102=/data/flowers102/test") for d in args.data or []]
    retrieval = []
    for item in args.retrieval or []:
        if "=" in item and "://" not in item.split("=", 1)[0]:
            retrieval.append(_split_pair(item, "--retrieval", "cc3m-val=./data/cc3m-val"))
        else:
            retrieval.append((posixpath.basename(item.rstrip("/")), item))
    if not classification and not retrieval:
        raise CloobError("no eval set given", "add --datasets flowers102 ... | all, --data NAME=URI or --retrieval URI")
    return classification, retrieval


def _fmt(v) -> str:
    return "-" if v is None else f"{100 * v:6.2f}"


def _cmd_evaluate(args) -> int:
    import posixpath

    from cloob.evaluate.pairs import evaluate_many
    from cloob.evaluate.runner import EvalSettings

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    settings = EvalSettings(batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                            device=args.device, limit=args.limit, diag_samples=args.diag_samples, seed=args.seed,
                            threads=args.threads)
    from cloob.evaluate.targets import resolve_models

    classification, retrieval = _eval_sets(args)
    models = resolve_models(args.models, args.registry or posixpath.join(args.store, "registry"))
    results = args.results or posixpath.join(args.store, "results")
    cache = None if args.no_cache else posixpath.join(args.store, "cache", "classifiers")
    failed = {"model": 0, "set": 0, "pair": 0}
    flagged: dict[str, str] = {}
    print(f"{'model':40s} {'dataset':14s} {'main':>22s} {'top1':>6s} {'top5':>6s} {'i2t@1':>6s} {'t2i@1':>6s} "
          f"{'images':>7s} {'skip':>5s} {'time':>7s}")
    for o in evaluate_many(models, classification, retrieval, results=results, cache_root=cache,
                           settings=settings, force=args.force, pretraining=args.pretraining,
                           progress=not args.no_progress):
        if o.error:
            failed["set" if o.model == "*" else "model" if o.dataset == "*" else "pair"] += 1
            print(f"error: {o.model if o.model != '*' else o.dataset}: {o.error}", file=sys.stderr)
            continue
        r = o.row
        note = " (already in results)" if o.reused else (" (cached classifier)" if o.extra.get("classifier_cached") else "")
        label = f"{r['run_id']}" + (f"@{r['step']}" if r.get("step") is not None else "")
        main = f"{r['main_metric']} {_fmt(r['main_value'])}"
        print(f"{shorten(label, 40):40s} {r['dataset'][:14]:14s} {main:>22s} {_fmt(r.get('top1')):>6s} {_fmt(r.get('top5')):>6s} "
              f"{_fmt(r.get('i2t_r1')):>6s} {_fmt(r.get('t2i_r1')):>6s} {r['n_images']:7d} {r['n_skipped']:5d} "
              f"{r['seconds']:6.1f}s{note}")
        if r.get("dataset_warnings"):
            flagged.setdefault(r["dataset"], r["dataset_warnings"])
    for ds, w in flagged.items():  # a number that may not compare with the paper's is never shown bare
        print(f"warning: {ds}: {w}")
    print(f"results: {results}  (cloob results --results {results})")
    if not any(failed.values()):
        return 0
    # Said last, and once more as the exit status: among many rows an error scrolls away.
    parts = [f"{failed['model']} of {len(models)} models could not be evaluated" if failed["model"] else "",
             f"{failed['set']} eval sets could not be opened" if failed["set"] else "",
             f"{failed['pair']} (model, set) pairs failed" if failed["pair"] else ""]
    print(f"failed: {'; '.join(p for p in parts if p)} (errors above)", file=sys.stderr)
    return 2


def _cmd_results(args) -> int:
    from cloob.results.report import run_command

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    return run_command(args)


def _cmd_registry(args) -> int:
    from cloob.registry.command import run_command

    return run_command(args)


def _cmd_import(args) -> int:
    from cloob.registry.reference_import import import_reference

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    if len(args.files) > 1 and (args.name or args.out):
        raise CloobError("--name and --out name one import, and several files were given",
                         "import the files one at a time with their --name/--out, or leave both out")
    names = []
    for file in args.files:
        print(f"reading {file} ...", flush=True)
        r = import_reference(file, store=args.store, out=args.out, registry=args.registry, arch=args.arch,
                             name=args.name, aliases=args.alias or [], pretraining=args.pretraining,
                             method=args.method)
        m, src = r.meta, r.meta["source"]
        print(f"{'imported' if r.new else 'already imported'} {src['file']} (sha256 {src['sha256'][:12]}, "
              f"epoch {src.get('epoch', '?')}): {m['arch']}, method {m['method']}, pretraining {m['pretraining_data']}"
              f"{'; dropped ' + ', '.join(src['dropped']) if src['dropped'] else ''}")
        print(f"  checkpoint: {r.checkpoint}  (model sha256 {m['model_sha256'][:12]})")
        moved = f", moved {', '.join(r.moved)}" if r.moved else ""
        print(f"  {'registered' if r.registered else 'already registered'} {r.entry['id'][:12]} as {m['run_name']}{moved}")
        names.append(m["run_name"])
    print(f"evaluate: cloob evaluate {' '.join(names)} --datasets all --store {args.store} && "
          f"cloob results --store {args.store}")
    return 0


def _cmd_models(args) -> int:
    from cloob.architectures import known_architectures

    print("\n".join(known_architectures()))
    return 0


def _cmd_recipes(args) -> int:
    import textwrap

    from cloob.config import RECIPES_DIR

    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        # The recipe's opening comment up to its first blank or indented (command) line: whole sentences.
        words = []
        for line in p.read_text().splitlines():
            text = line[1:] if line.startswith("#") else None
            if text is None or not text.strip() or text.startswith("   "):
                break
            words.append(text.strip())
        print(textwrap.fill(" ".join(words) or "-", width=110, initial_indent=f"{p.stem:20s} ",
                            subsequent_indent=" " * 21))
    return 0


def build_parser(extend: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The `cloob` command line; `extend(subparsers)` adds more commands (flows.cli: demo, study, deploy)."""
    parser = argparse.ArgumentParser(prog="cloob", description="Train and evaluate CLOOB and CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a recipe (YAML path or shipped name) with overrides")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=100")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) on this node, via torchrun")
    p.add_argument("--max-restarts", type=int, default=None, metavar="N",
                   help="restart the group up to N times when a rank dies, resuming from the last checkpoint "
                        "(default: the recipe's train.max_restarts, 0)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("prepare", help="download a pretraining dataset into webdataset shards (img2dataset)")
    p.add_argument("spec", help="a data_specs name (demo, cc3m, yfcc15m) or a spec YAML path")
    p.add_argument("--out", required=True, help="dataset folder or URL (s3://bucket/prefix, ...)")
    p.add_argument("--input", action="append",
                   help="the source file: CC3M TSV, YFCC100M metadata (yfcc100m_dataset.sql, the 25-column "
                        "yfcc100m_dataset(.bz2), or the original ten parts: --input once per part), or your "
                        "url/caption table")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set download.processes=16 (repeatable)")
    p.add_argument("--limit", type=int, help="take only the first N source rows")
    p.add_argument("--retry-failed", action="store_true", help="download again the rows that failed")
    p.add_argument("--force", action="store_true", help="delete a different dataset at --out and start over")
    p.add_argument("--purge-removed", action="store_true",
                   help="delete from the shards, for good, the samples of rows that the newest version no longer "
                        "has (removed from the source); downloads nothing")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)")
    from cloob.prepare.distributors import add_cluster_argument  # stdlib only: the table of distributors

    add_cluster_argument(p, "downloads (default: a local one, local[download.processes] or a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("prepare-downstream", help="download, verify and unpack zero-shot evaluation sets")
    p.add_argument("names", nargs="+", help="datasets (see data_specs/downstream/), or all")
    p.add_argument("--out", required=True, help="downstream root folder or URL; each set goes to <out>/<name>/")
    p.add_argument("--source", action="append", metavar="NAME=PATH",
                   help="your copy, a folder (extracted, or the distribution's files side by side) or an archive: "
                        "imagenet=/data/imagenet (required for imagenet), flowers102=/data/flowers")
    p.add_argument("--split", action="append", metavar="NAME=SPLIT",
                   help="another split than the published test split (e.g. flowers102=valid for a copy without "
                        "the test split); every result on it is flagged as not comparable with the paper")
    p.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_prepare_downstream)

    p = sub.add_parser("evaluate", help="zero-shot classification and retrieval of checkpoints -> results table",
                       description="Evaluate models on eval sets; one results-table row per (model, set).")
    p.add_argument("models", nargs="+",
                   help="a checkpoint folder, a run folder (its latest checkpoint), ARCH=<weights file> "
                        "for open_clip weights (e.g. RN50=~/weights/RN50.pt), local or fsspec URLs; or a registry "
                        "alias or entry id (latest, best-flowers102, ac5a68...)")
    p.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="prepared downstream sets under --downstream (flowers102 ...), or all")
    p.add_argument("--data", action="append", metavar="SPEC=URI",
                   help="a set by spec name/path and location: class folders or webdataset shards (cls) (repeatable)")
    p.add_argument("--retrieval", action="append", metavar="[NAME=]URI",
                   help="webdataset shards of captioned images for image<->text recall@k (repeatable)")
    p.add_argument("--store", default=".", help="root of downstream/, results/ and cache/ (default: .)")
    p.add_argument("--downstream", help="prepared downstream root (default: <store>/downstream)")
    p.add_argument("--results", help="results table location (default: <store>/results)")
    p.add_argument("--registry", help="registry that aliases are looked up in (default: <store>/registry)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="DataLoader workers decoding images (default: cores - 1, at most 8)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's); "
                                                 "1 with --workers = cores suits small models")
    p.add_argument("--precision", choices=["auto", "fp32", "amp"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--limit", type=int, help="at most N images per set (a seeded random subset)")
    p.add_argument("--diag-samples", type=int, default=2000, help="embeddings used for the diagnostics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretraining", help="pretraining data name recorded for ARCH=<weights> models")
    p.add_argument("--force", action="store_true", help="evaluate again pairs already in the results table")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the text classifier cache")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("results", help="the results table side by side: datasets x checkpoints, with the paper")
    from cloob.results.report import add_arguments  # no pyarrow/matplotlib at import

    add_arguments(p)
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("registry", help="register checkpoints with their lineage; list, show, resolve; aliases",
                       description="register REF... | list | show NAME | resolve NAME | alias ALIAS ENTRY | best | "
                                   "promote [NAME...] | history ALIAS")
    from cloob.registry.command import add_arguments as registry_arguments  # light: argparse only

    registry_arguments(p)
    p.set_defaults(func=_cmd_registry)

    p = sub.add_parser("import", help="convert the paper's published checkpoints (ml-jku/cloob) into ours, registered",
                       description="Convert an ml-jku/cloob checkpoint (cloob_rn50_yfcc_epoch_28.pt, "
                                   "cloob_rn50x4_yfcc_epoch_28.pt) into a checkpoint folder (open_clip "
                                   "RN50-quickgelu / RN50x4-quickgelu, loaded strictly), register it with the "
                                   "file's name and sha256, and print how to evaluate it.")
    p.add_argument("kind", choices=["ml-jku-cloob"], help="whose checkpoint: ml-jku-cloob (github.com/ml-jku/cloob)")
    p.add_argument("files", nargs="+", metavar="FILE", help="checkpoint files, local or fsspec URLs")
    p.add_argument("--arch", help="RN50 or RN50x4 (default: what the file says, checked against its shapes)")
    p.add_argument("--name", help="checkpoint folder, run id and registry alias (default: "
                                  "ml-jku-<method>-<arch>-<pretraining>, e.g. ml-jku-cloob-rn50-yfcc15m)")
    p.add_argument("--store", default=".", help="root of imports/ and registry/ (default: .)")
    p.add_argument("--out", help="checkpoint folder to write (default: <store>/imports/<name>)")
    p.add_argument("--registry", help="registry location (default: <store>/registry)")
    p.add_argument("--alias", action="append", help="also move this registry alias to it (repeatable)")
    p.add_argument("--pretraining", default="yfcc15m",
                   help="the data it was trained on, for the results table's paper columns (default: yfcc15m)")
    p.add_argument("--method", help="clip or cloob (default: what the file says, else cloob)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS config)")
    p.set_defaults(func=_cmd_import)

    sub.add_parser("models", help="list model architectures").set_defaults(func=_cmd_models)
    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=_cmd_recipes)
    if extend is not None:
        extend(sub)
    return parser


def _stores(args) -> list[str]:
    """The locations a command was given, for naming the store in an error."""
    found = [v for a in ("registry", "results", "store", "out", "downstream") if isinstance(v := getattr(args, a, None), str)]
    for a in ("models", "refs", "files"):  # checkpoints given by URL
        found += [v for v in getattr(args, a, None) or [] if isinstance(v, str) and "://" in v]
    return found


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run a command; `parser` lets flows.cli add the commands that orchestrate (demo, deploy)."""
    args = (parser or build_parser()).parse_args(argv)
    if not getattr(args, "own_logging", False):  # the flow commands keep Prefect's console format
        logging.basicConfig(level=os.environ.get("CLOOB_LOG_LEVEL", "WARNING"),
                            format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncio").addFilter(QuietStorageTasks())  # no stray tracebacks of a lost store's tasks
    try:
        return args.func(args)
    except CloobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A store that is down, slow, full or misaddressed is no bug: one message naming it and the fix.
        err = storage_failure(e, _stores(args))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `cloob results | head`: the reader left; say nothing more (and not on the closed pipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted: finished checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
