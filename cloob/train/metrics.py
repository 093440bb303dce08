"""Per-step training metrics: a JSONL file and TensorBoard events in a local folder.

metrics.jsonl keeps flat keys (loss, lr, skipped_decode, ...: the launcher, the flows, the report's
training curves and the benchmarks read them); TensorBoard gets them grouped by a prefix
(`tensorboard_tag`), so its Scalars page shows a train/ and a data/ section.

When the run folder is remote (s3://...), metrics are written to a local mirror and uploaded with
every checkpoint. On resume, lines after the resumed step are dropped and TensorBoard's events after
it are purged, so the log shows one trajectory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: skipped samples and reopened shard reads under data/,
    the rest under train/."""
    # nonfinite_skipped counts skipped optimizer steps, not samples: it belongs with the training.
    data = key in ("skipped", "read_retries") or key.startswith("skipped_")
    return f"data/{key}" if data else f"train/{key}"


class MetricsLogger:
    def __init__(self, local_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.dir = Path(local_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = open(self.jsonl, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to %s only", self.jsonl)

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
        whoever follows the file, not to TensorBoard."""
        extra = {"total_steps": total_steps} if total_steps is not None else {}
        self._file.write(json.dumps({"step": step, **extra, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(tensorboard_tag(k), v, step)

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
