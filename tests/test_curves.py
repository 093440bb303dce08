"""Pictures of training and results: TensorBoard's tag groups, the training curves beside the report
(training.png, training-<run>.png, training.json), results.png's chance and paper markers, and the
markdown with its images embedded for the Prefect UI.

Inputs are built here (a metrics.jsonl by MetricsLogger or by hand, a results table by append_rows),
never by training, so the file stays fast.
"""

from __future__ import annotations

import json

from cloob.train.metrics import MetricsLogger


def _tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_tags_are_grouped_and_the_jsonl_keeps_flat_keys(tmp_path):
    logged = {"loss": 4.5, "lr": 1e-3, "inv_tau": 30.0, "samples_per_s": 120.0, "epoch": 0, "skipped": 3,
              "skipped_decode": 2, "skipped_caption": 1, "nonfinite_skipped": 0}
    m = MetricsLogger(tmp_path, tensorboard=True)
    m.log(1, logged, total_steps=20)
    m.log(10, {**logged, "loss": 2.25}, total_steps=20)
    m.close()
    scalars = _tb_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"train/loss", "train/lr", "train/inv_tau", "train/samples_per_s", "train/epoch",
                            "train/nonfinite_skipped", "data/skipped", "data/skipped_decode", "data/skipped_caption"}
    assert scalars["train/loss"] == [(1, 4.5), (10, 2.25)]
    assert scalars["data/skipped_decode"] == [(1, 2.0), (10, 2.0)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 10, "total_steps": 20, **logged, "loss": 2.25}  # flat keys, as readers expect
