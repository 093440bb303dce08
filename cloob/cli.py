"""The `cloob` command line: train, demo, and listings. Errors print one message and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from cloob.errors import CloobError


def _cmd_train(args) -> int:
    if args.nproc_per_node > 1:
        # Re-launch under torchrun so a single command covers the multi-process case too.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc_per_node}", "-m", "cloob.train", args.recipe, *args.overrides]
        return subprocess.call(cmd)
    from cloob.config import load_recipe
    from cloob.train import train

    train(load_recipe(args.recipe, args.overrides))
    return 0


def _cmd_demo(args) -> int:
    from cloob.demo import run_demo

    run_demo(out=Path(args.out), steps=args.steps, samples=args.samples, workers=args.workers)
    return 0


def _cmd_models(args) -> int:
    from cloob.model import list_architectures

    print("\n".join(list_architectures()))
    return 0


def _cmd_recipes(args) -> int:
    from cloob.config import RECIPES_DIR

    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0].lstrip("# ")
        print(f"{p.stem:20s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloob", description="Train and evaluate CLOOB and CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a recipe (YAML path or shipped name) with overrides")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=100")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) on this node, via torchrun")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="generate a small image-caption set and train a tiny CLOOB model on it")
    p.add_argument("--out", default="./cloob-demo", help="folder for the data, run and checkpoints")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_cmd_demo)

    sub.add_parser("models", help="list model architectures").set_defaults(func=_cmd_models)
    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=_cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CLOOB_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CloobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
