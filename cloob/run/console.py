"""`cloob train` in a terminal: the run under cloob.run.launch, its output shown live, signals passed on.

The trainer's lines are shown as they come. Its progress comes from metrics.jsonl (every
train.log_every steps): a progress bar on a terminal when train.progress is true, else a line at
most every LINE_EVERY_S seconds (and at the last step). SIGTERM and SIGINT stop the whole process
tree (torchrun, the ranks, their DataLoader workers) and end with 143 or 130 and one line saying
that a rerun resumes; an error ends with its one `error:`/`fix:` message (exit 2, by cloob.cli).

Stopping waits for the ranks to finish their step and write its checkpoint (train.stop_grace_s;
cloob.train.preemption), and the line names that checkpoint: `cloob train: preempted by SIGTERM at
step 37; checkpoint step_00000037 written; rerun the same command to resume`. The same line, and
143, when the SIGTERM went to torchrun or the ranks instead (a batch system, a node going away). A
second SIGTERM or Ctrl-C does not wait: it kills the tree at once, keeping the checkpoints finished
before.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from cloob.config import load_recipe
from cloob.run.launch import launch
from cloob.run.lifeline import die_with_wrapper
from cloob.train.preemption import message

LINE_EVERY_S = 10.0


class _Display:
    def __init__(self, bar: bool, lines: bool):
        self.want_bar, self.lines = bar, lines
        self.bar = None
        self.last_line = 0.0

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def progress(self, p: dict) -> None:
        step, total = p["step"], p.get("total_steps")
        if self.want_bar:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{p['loss']:.4f}", lr=f"{p['lr']:.2e}", inv_tau=f"{p['inv_tau']:.1f}",
                                 sps=f"{p['samples_per_s']:.0f}", skipped=p.get("skipped", 0))
        elif self.lines and (time.monotonic() - self.last_line >= LINE_EVERY_S or step == total):
            self.last_line = time.monotonic()
            print(f"step {step}/{total or '?'}: loss {p['loss']:.4f}, lr {p['lr']:.2e}, inv_tau {p['inv_tau']:.1f}, "
                  f"{p['samples_per_s']:.0f} samples/s, {p.get('skipped', 0)} skipped", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _retrain(recipe: str, overrides: list[str], r) -> tuple[list[str], bool]:
    """A retrain's two special cases, as the pipeline has them (cloob.run.state): init_from=champion
    with no champion yet trains from scratch; a warm start from this recipe's own run on the same
    data version trains nothing. Returns (overrides, nothing to do)."""
    import posixpath

    from cloob.run.state import identify, no_champion_yet, warm_start_of_itself

    if no_champion_yet(r.train.init_from, posixpath.join(r.train.output.rstrip("/"), "registry")):
        print("train.init_from=champion: the registry has no champion yet, so this run trains from scratch",
              file=sys.stderr)
        return [*overrides, "train.init_from=null"], False
    if r.train.init_from and (parent := warm_start_of_itself(load_recipe(recipe, identify(recipe, overrides)))):
        print(f"nothing to train: train.init_from={r.train.init_from} is this recipe's own run on the same data "
              f"version ({parent[1]}); the data has not changed since", file=sys.stderr)
        return overrides, True
    return overrides, False


class _Again(Exception):
    """A second stop signal: stop at once."""


def train_command(recipe: str, overrides: list[str], nproc_per_node: int = 1, max_restarts: int | None = None) -> int:
    """Run one training run from the command line; returns the exit code (errors raise CloobError).
    max_restarts: torchrun's restarts of the group after a failure (default: train.max_restarts)."""
    r = load_recipe(recipe, overrides)  # a bad recipe is one message before anything starts
    overrides, done = _retrain(recipe, overrides, r)
    if done:
        return 0
    # `uv run` passes SIGINT and SIGTERM on, but a SIGKILL of uv would leave this process (and the
    # run) going: a process started by uv ends with it.
    die_with_wrapper(signal.SIGTERM)
    stop, caught = threading.Event(), []

    def on_signal(signum, _frame):
        caught.append(signum)
        if len(caught) > 1:
            raise _Again  # out of the launcher's wait: it kills the tree on its way out
        stop.set()

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    display = _Display(bar=r.train.progress and sys.stderr.isatty(), lines=r.train.progress)
    try:
        result = launch(recipe, overrides, nproc_per_node=nproc_per_node, stop=stop, on_line=display.line,
                        on_progress=display.progress, max_restarts=max_restarts)
    except _Again:
        result = None
    finally:
        display.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if result is None:
        print(f"stopped at once by a second {signal.Signals(caught[-1]).name}: finished checkpoints are kept; "
              "rerun the same command to resume", file=sys.stderr)
        return 128 + caught[0]
    if (p := result.preempted) is not None and not result.ok:
        # The ranks stopped after one step and wrote its checkpoint (this process's own signal, passed on
        # as SIGTERM, or one that came to torchrun or the ranks from elsewhere).
        sig = caught[0] if caught else p["signal"]
        print(message(sig, p["step"], p.get("checkpoint")), file=sys.stderr)
        return 128 + sig
    if result.cancelled and caught:
        sig = caught[0]
        print(f"stopped by {signal.Signals(sig).name}: finished checkpoints are kept; rerun the same command "
              "to resume", file=sys.stderr)
        return 128 + sig
    result.check()
    return 0
