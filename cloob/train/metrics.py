"""Per-step training metrics: metrics.jsonl in a local folder, and the tracking backends.

metrics.jsonl keeps flat keys (loss, lr, skipped_decode, ...: the launcher, the flows, the report's
training curves and the benchmarks read them) and is always written: it is the contract. The same
numbers go to the backends `train.report_to` names (cloob.train.tracking: TensorBoard by default,
wandb) grouped by a prefix (`tensorboard_tag`), so their pages show a train/ and a data/ section.
A backend that fails mid-run is dropped with one warning; the run and metrics.jsonl go on.

When the run folder is remote (s3://...), metrics are written to a local mirror and uploaded with
every checkpoint. On resume, lines after the resumed step are dropped and TensorBoard's events after
it are purged, so the log shows one trajectory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cloob.train.tracking import RunContext, close_all, open_sinks, parse_report_to

log = logging.getLogger(__name__)


def tensorboard_tag(key: str) -> str:
    """The tag of a metrics.jsonl key in every tracking backend (TensorBoard's, W&B's): skipped samples
    and reopened shard reads under data/, the rest under train/."""
    # nonfinite_skipped counts skipped optimizer steps, not samples: it belongs with the training.
    data = key in ("skipped", "read_retries") or key.startswith("skipped_")
    return f"data/{key}" if data else f"train/{key}"


class MetricsLogger:
    """metrics.jsonl plus the tracking backends (sinks). report_to: the backends' names (a string
    "tensorboard,wandb" or a list; None: TensorBoard if `tensorboard`, as before report_to existed).
    run_name and config (the recipe, as a dict) are what W&B shows. A backend that cannot start
    raises CloobError before anything is written."""

    def __init__(self, local_dir: str | Path, resume_step: int = 0, tensorboard: bool = True, *,
                 report_to: str | list[str] | None = None, run_name: str | None = None, config: dict | None = None):
        self.dir = Path(local_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        names = parse_report_to(report_to) if report_to is not None else (["tensorboard"] if tensorboard else [])
        self._sinks = open_sinks(names, RunContext(name=run_name or self.dir.name, log_dir=self.dir,
                                                   config=config or {}, resume_step=resume_step))
        self.jsonl = self.dir / "metrics.jsonl"
        try:
            self._truncate_after(resume_step)
            self._file = open(self.jsonl, "a", encoding="utf-8")
        except BaseException:
            close_all(self._sinks)
            raise
        self._closed = False

    @property
    def sinks(self) -> list[str]:
        """The backends still taking metrics."""
        return list(self._sinks)

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.jsonl)

    def log(self, step: int, metrics: dict, total_steps: int | None = None) -> None:
        """One line of metrics.jsonl; total_steps (the run's planned length) goes there only, for
        whoever follows the file, not to the backends."""
        extra = {"total_steps": total_steps} if total_steps is not None else {}
        self._file.write(json.dumps({"step": step, **extra, **metrics}) + "\n")
        self._file.flush()
        if self._sinks:
            scalars = {tensorboard_tag(k): v for k, v in metrics.items() if isinstance(v, (int, float))}
            self._each("log", step, scalars)

    def flush(self) -> None:
        self._file.flush()
        self._each("flush")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        sinks, self._sinks = self._sinks, {}
        close_all(sinks)

    def _each(self, method: str, *args) -> None:
        for name, sink in list(self._sinks.items()):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001 -- any backend error: metrics.jsonl is the contract
                log.warning("tracking backend %s failed (%s: %s); it is dropped for the rest of the run, "
                            "metrics.jsonl goes on", name, type(e).__name__, " ".join(str(e).split())[:300])
                del self._sinks[name]
                close_all({name: sink})
