"""`cloob demo`: the whole pipeline on this machine with nothing to set up.

The generated demo set is served over HTTP on 127.0.0.1 and downloaded into webdataset shards by
img2dataset; a tiny CLOOB model and its CLIP baseline train on CPU under torchrun; both are
registered, evaluated zero-shot on two generated sets whose class names the captions use (shapes:
colour + shape, 18 classes; colors: 6 classes), and the results table is printed. It all runs as
the `cloob-pipeline` flow under an ephemeral Prefect whose database lives in <store>/prefect, so the
runs, logs and artifacts can be browsed afterwards. Run it again: every step is found done and
skipped; stop it at any point and run it again: it goes on from where it was (training from its
last checkpoint).
"""

from __future__ import annotations

import os
import posixpath
import sys
import time

DOWNSTREAM = ["shapes", "colors"]
DEFAULT_STEPS = 300  # the steps tune_demo chose the settings at
EPHEMERAL_STARTUP_S = 300


def _use_ephemeral_prefect(home: str) -> None:
    """Point Prefect at a database under the store, before Prefect is imported (it reads settings once)."""
    if "prefect" in sys.modules:
        raise RuntimeError("flows.demo must set PREFECT_HOME before prefect is imported")
    if os.environ.pop("PREFECT_API_URL", None):
        print("note: PREFECT_API_URL is ignored by the demo, which runs its own ephemeral Prefect", file=sys.stderr)
    os.makedirs(home, exist_ok=True)  # Prefect makes only the last level itself
    os.environ["PREFECT_HOME"] = home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect gives its temporary server 20 s to start; a busy laptop (or 2 cores importing torch
    # at the same time) needs more, and the failure is a 40-line traceback.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))


def local_server_command(home: str, port: int = 4200) -> str:
    """The command the demo prints to browse its runs: a Prefect server on its database, with
    Prefect's telemetry off as for the ephemeral one (else the server phones home, and offline logs
    `Failed to send telemetry`)."""
    # The UI asks the server's PREFECT_UI_API_URL where the API is, and that defaults to port 4200
    # whatever port the server listens on: say both, so that another port works too.
    return (f"PREFECT_HOME={home} PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=http://127.0.0.1:{port}/api "
            f"prefect server start --port {port}   then open http://127.0.0.1:{port} (flow runs, logs, the "
            f"results table and report artifacts; for another port, change all three {port}s)")


def store_and_prefect_home(store: str, elsewhere: str) -> tuple[str, str]:
    """(the store, absolute when it is a folder; the ephemeral Prefect's home: <store>/prefect, or
    <elsewhere>/prefect in the working directory when the store is a bucket)."""
    from cloob.storage import Location

    where = Location(store)
    if where.is_local:
        store = os.path.abspath(where.root)
    return store, os.path.join(store if where.is_local else os.path.abspath(elsewhere), "prefect")


def demo_recipes(seeds: list[int]) -> list[str]:
    """Each seed's CLOOB and CLIP runs of the tiny recipe, each method at its own setting: the
    method_overrides of cloob/studies/demo.yaml, which `cloob study tune_demo` chose (BENCHMARKS.md, "The demo")."""
    from cloob.study.spec import load_study

    study = load_study("demo")
    return [" ".join(["tiny", f"loss.method={m}", *study.method_overrides.get(m, []), *([f"train.seed={s}"] if s else [])])
            for s in seeds for m in study.methods]


def demo_parameters(store: str, steps: int = DEFAULT_STEPS, samples: int = 4096, nproc_per_node: int = 1,
                    seeds: int = 1) -> dict:
    """The pipeline parameters of the demo (the README's numbers come from these)."""
    return dict(store=store, specs=["demo"], recipes=demo_recipes(list(range(seeds))), downstream=DOWNSTREAM,
                overrides=[f"train.steps={steps}", f"train.checkpoint_every={max(1, steps // 3)}"],
                spec_overrides=[f"source.samples={samples}"], nproc_per_node=nproc_per_node,
                # The two sets are 600 images of 32 px: decoding them in this process beats starting a
                # worker (a fork server importing torch and open_clip: ~6 s of CPU) to do it.
                eval_settings={"batch_size": 64, "workers": 0})


def over_seeds(results: str, runs: list[dict]) -> str:
    """Each method's mean ± std over the demo's seeds per set, with every seed's value: the demo's
    numbers as the README and BENCHMARKS.md give them."""
    from cloob.results.table import read_rows
    from cloob.study.stats import summarize

    ids = {posixpath.basename(r["run_dir"].rstrip("/")): r for r in runs}
    order = list(ids)  # the pipeline's order: seed 0's runs first
    rows = sorted((r for r in read_rows(results, latest=True).to_pylist()
                   if r["run_id"] in ids and r["step"] == ids[r["run_id"]]["step"]), key=lambda r: order.index(r["run_id"]))
    lines = [f"Over {len(ids) // 2} seeds (mean ± std, then each seed):"]
    for method in sorted({r["method"] for r in rows}):
        parts = []
        for ds in DOWNSTREAM:
            values = [r["main_value"] for r in rows if r["method"] == method and r["dataset"] == ds]
            if values:
                v = summarize(values)
                parts.append(f"{ds} {100 * v.mean:.1f} ± {100 * (v.std or 0):.1f} "
                             f"({', '.join(f'{100 * x:.1f}' for x in values)})")
        lines.append(f"  {method:6s} " + "; ".join(parts))
    return "\n".join(lines)


def run_demo(store: str = "./cloob-demo", steps: int = DEFAULT_STEPS, samples: int = 4096, nproc_per_node: int = 1,
             seeds: int = 1) -> int:

    if seeds < 1:
        from cloob.errors import CloobError

        raise CloobError(f"--seeds {seeds}: the demo needs at least one seed", "pass --seeds 1 or more")
    t0 = time.time()
    store, home = store_and_prefect_home(store, ".cloob-demo-prefect")
    _use_ephemeral_prefect(home)
    from cloob.errors import CloobError
    from cloob.results.arrange import build_report
    from cloob.results.render import render_text
    from flows.pipeline import pipeline
    from flows.signals import stop_on_signals

    with stop_on_signals("cloob demo", exit_process=True):
        try:
            out = pipeline(**demo_parameters(store, steps, samples, nproc_per_node, seeds))
        except RuntimeError as e:
            if "ephemeral Prefect API server" not in str(e):
                raise
            raise CloobError(f"Prefect's temporary server did not start within "
                             f"{os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']} s",
                             "the machine is busy: run again, or allow it longer with "
                             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=900") from None
    report = build_report(out["results"], datasets=DOWNSTREAM)
    print()
    print(render_text(report))
    print()
    if seeds > 1:
        print(over_seeds(out["results"], out["runs"]))
        print()
    print(f"results table:  {out['results']}   (cloob results --store {store})")
    print(f"report:         {out['report']}")
    print(f"registry:       {posixpath.join(store, 'registry')}   (cloob registry list --store {store})")
    for r in out["runs"]:
        print(f"checkpoint:     {r['checkpoint']}  ({r['method']}, step {r['step']})")
    print(f"Prefect UI:     {local_server_command(home)}")
    print(f"time:           {time.time() - t0:.0f} s")
    return 1 if out["failed"] else 0
