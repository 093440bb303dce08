"""Pictures of training and results: TensorBoard's tag groups, the training curves beside the report
(training.png, training-<run>.png, training.json), results.png's chance and paper markers, and the
markdown with its images embedded for the Prefect UI.

Inputs are built here (a metrics.jsonl by MetricsLogger or by hand, a results table by append_rows),
never by training, so the file stays fast.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloob.results.table import append_rows
from cloob.train.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


# ------------------------------------------------------------------------- a small results store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CLASSES = {"shapes": 18, "colors": 6, "gtsrb": 43, "flowers102": 102}
# (run, method) -> step -> dataset -> top-1 fraction
EVALS = {("tiny-clip", "clip"): {50: {"shapes": 0.2, "colors": 0.5}, 100: {"shapes": 0.45, "colors": 0.9}},
         ("tiny-cloob", "cloob"): {50: {"shapes": 0.1, "colors": 0.3}, 100: {"shapes": 0.35, "colors": 0.8},
                                   200: {"shapes": 0.5, "colors": 1.0}},
         ("tiny-gone", "cloob"): {100: {"shapes": 0.3, "colors": 0.6}}}


def _row(run, method, step, dataset, value, uri, **kw):
    return {"run_id": run, "checkpoint_id": f"{run}-{step}", "dataset": dataset, "task": "zeroshot",
            "method": method, "arch": "tiny-vit", "pretraining_data": "demo", "step": step, "checkpoint_uri": uri,
            "n_images": 120, "n_skipped": 0, "n_classes": CLASSES[dataset], "main_metric": "top1",
            "main_value": value, "top1": value, "top5": min(1.0, value + 0.2), "finished_at": T0,
            "row_uuid": uuid.uuid4().hex, **kw}


def _metrics(run_dir: Path, method: str) -> list[dict]:
    """A metrics.jsonl as training writes it (MetricsLogger), plus a line cut by a crash."""
    scale = 0.05 if method == "cloob" else 1.0
    lines = [{"loss": scale * (5 - s / 50), "lr": 1e-3 * min(1, s / 50), "inv_tau": 30 + s / 100,
              "samples_per_s": 100.0 + s, "epoch": 0, "skipped": 0} for s in (1, 50, 100, 150, 200)]
    m = MetricsLogger(run_dir, tensorboard=False)
    for s, rec in zip((1, 50, 100, 150, 200), lines):
        m.log(s, rec, total_steps=200)
    m.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 250, "loss": 0.')  # killed mid-line
    return [{"step": s, **rec} for s, rec in zip((1, 50, 100, 150, 200), lines)]


def _store(tmp_path: Path) -> tuple[str, dict[str, list[dict]]]:
    """(results uri, run -> the metrics logged): three runs, one without metrics.jsonl, and external weights."""
    rows, logged = [], {}
    for (run, method), steps in EVALS.items():
        run_dir = tmp_path / "runs" / run
        (run_dir / "checkpoints").mkdir(parents=True)
        if run != "tiny-gone":
            logged[run] = _metrics(run_dir, method)
        for step, vals in steps.items():
            uri = str(run_dir / "checkpoints" / f"step_{step:08d}")
            rows += [_row(run, method, step, ds, v, uri) for ds, v in vals.items()]
    rows.append(_row("open_clip:RN50:rn50.pt", "clip", None, "shapes", 0.6, "/weights/rn50.pt", arch="RN50"))
    uri = str(tmp_path / "results")
    append_rows(uri, rows)
    return uri, logged


@pytest.fixture
def runs(tmp_path):
    return _store(tmp_path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(the store's metrics, the report folder, write_report's answer, the files rendered): drawn once
    for the tests that read the pictures (drawing is most of this file's time)."""
    from cloob.results.arrange import build_report
    from cloob.results.report import render_report, write_report

    tmp = tmp_path_factory.mktemp("report")
    uri, logged = _store(tmp)
    files = render_report(build_report(uri))
    return logged, tmp / "report", write_report(build_report(uri), str(tmp / "report"), files), files


def _pts(points):
    return [list(p) for p in points]


def test_training_curves_beside_the_report(written):
    from matplotlib.image import imread

    logged, base, out, _ = written
    assert out["markdown"] == str(base / "results.md") and out["png"] == str(base / "results.png")
    assert out["training_png"] == str(base / "training.png") and out["training_data"] == str(base / "training.json")
    for name in ("training.png", "training-tiny-clip.png", "training-tiny-cloob.png"):
        assert (base / name).read_bytes()[:8] == PNG_MAGIC
        h, w, _ = imread(base / name).shape
        assert w > 600 and h > 300
    assert not (base / "training-tiny-gone.png").exists()

    data = json.loads((base / "training.json").read_text())
    assert data["comparison_png"] == "training.png"
    by_run = {r["run_id"]: r for r in data["runs"]}
    assert set(by_run) == {"tiny-clip", "tiny-cloob"}  # no metrics.jsonl: no curves; external weights: none
    for run, lines in logged.items():
        got = by_run[run]
        assert got["png"] == f"training-{run}.png"
        for key in ("loss", "lr", "inv_tau", "samples_per_s"):
            assert got["series"][key] == [[rec["step"], pytest.approx(rec[key])] for rec in lines], key
        # accuracy per evaluated step: the table's rows, in percent
        steps = EVALS[(run, got["method"])]
        for ds in ("shapes", "colors"):
            assert got["accuracy"][ds] == [[s, pytest.approx(100 * steps[s][ds])] for s in sorted(steps)]
    md = (base / "results.md").read_text()
    assert "## Training" in md and "](training.png)" in md
    assert "](training-tiny-clip.png)" in md and "](training-tiny-cloob.png)" in md
    assert re.search(r"tiny-gone: no training curves, no metrics\.jsonl at \S+tiny-gone/metrics\.jsonl", md)
    assert "open_clip:RN50" not in data["notes"][0]  # external weights are no note, just absent
    assert len(data["notes"]) == 1


def test_loss_has_a_panel_per_method_and_one_evaluated_step_draws_no_accuracy(runs, tmp_path):
    from cloob.results.arrange import build_report
    from cloob.results.curves import comparison_panels
    from cloob.results.training import gather

    uri, logged = runs
    training = gather(build_report(uri, runs=["tiny-clip", "tiny-cloob"], datasets=["shapes"]))
    titles = [p[0] for p in comparison_panels(training)]
    assert titles == ["loss (CLIP)", "loss (CLOOB)", "learning rate", "inv_tau (logit scale)", "samples/s",
                      "zero-shot shapes"]
    loss_clip = comparison_panels(training)[0][2]
    assert [lab for lab, _, _ in loss_clip] == ["clip tiny-clip"]
    one = gather(build_report(uri, runs=["tiny-clip"], datasets=["shapes"]))
    assert one.runs[0].accuracy["shapes"] == [(50, 20.0), (100, 45.0)]
    # a run evaluated at one step only: no accuracy curve
    (Path(uri).parent / "runs" / "tiny-gone" / "metrics.jsonl").write_text(
        json.dumps({"step": 100, "loss": 0.1, "lr": 1e-3, "inv_tau": 30, "samples_per_s": 50}) + "\n")
    gone = gather(build_report(uri, runs=["tiny-gone"]))
    assert gone.runs[0].accuracy == {} and gone.runs[0].series["loss"] == [(100, 0.1)]


# ------------------------------------------------------------------------------------ results.png

def test_results_chart_names_the_metric_marks_chance_and_labels_the_paper(runs):
    from cloob.results.arrange import build_report
    from cloob.results.figure import chart_data, render_png

    uri, _ = runs
    runs_dir = Path(uri).parent / "runs"
    append_rows(uri, [_row(run, method, step, "gtsrb", 0.04, str(runs_dir / run / "checkpoints" / f"step_{step:08d}"))
                      for (run, method), steps in EVALS.items() for step in steps])
    rep = build_report(uri, paper="cc3m:RN50:128", runs=["tiny-clip", "tiny-cloob"])
    chart = chart_data(rep)
    assert chart.title == "Zero-shot classification: top-1 accuracy (%)" and chart.ylabel == "top-1 accuracy (%)"
    assert chart.groups == ["gtsrb", "colors", "shapes", "mean"]  # the paper's sets first
    # chance: 100 / n_classes per set, none for the mean
    assert chart.chance == [pytest.approx(100 / 43), pytest.approx(100 / 6), pytest.approx(100 / 18), None]
    # the paper: markers where the set is one of the paper's (cc3m RN50 128 epochs: gtsrb 8.96 / 7.03)
    assert [(p.label, p.method) for p in chart.papers] == [("paper CLIP (cc3m RN50 128ep)", "clip"),
                                                           ("paper CLOOB (cc3m RN50 128ep)", "cloob")]
    assert [(r.value, r.std) for r in (chart.papers[0].values[0], chart.papers[1].values[0])] == [(8.96, 1.7),
                                                                                                 (7.03, 1.22)]
    assert chart.papers[0].values[1:3] == [None, None]
    # the paper's set on its own y range, apart from the demo's sets near 100%
    assert chart.panels == [[0], [1, 2, 3]]
    assert render_png(rep)[:8] == PNG_MAGIC
    only_demo = chart_data(build_report(uri, paper="cc3m:RN50:128", datasets=["shapes", "colors"], runs=["tiny-c*"]))
    assert only_demo.panels == [[0, 1, 2]] and only_demo.chance[:2] == [pytest.approx(100 / 6), pytest.approx(100 / 18)]
    assert only_demo.note == "the paper (cc3m RN50 128ep) has no published numbers for these datasets" and not chart.note


def test_results_chart_with_mixed_main_metrics_says_so(runs):
    from cloob.results.arrange import build_report
    from cloob.results.figure import chart_data

    uri, _ = runs
    ckpt = str(Path(uri).parent / "runs" / "tiny-clip" / "checkpoints" / "step_00000100")
    append_rows(uri, [_row("tiny-clip", "clip", 100, "flowers102", 0.3, ckpt, main_metric="mean_per_class_recall",
                           n_classes=102)])
    chart = chart_data(build_report(uri, runs=["tiny-clip"]))
    assert chart.title == "Zero-shot classification: main metric: mean per-class recall / top-1 accuracy (%)"
    assert chart.ticks[0] == "flowers102\n(mean per-class recall)" and chart.chance[0] == pytest.approx(100 / 102)


# --------------------------------------------------------------------------- embedded for Prefect

def test_embedded_markdown_carries_the_pictures_themselves(written):
    from cloob.results.render import embed_images

    _, base, _, files = written
    md = files["results.md"].decode()
    assert md == (base / "results.md").read_text()  # write_report wrote the files given
    embedded = embed_images(md, files)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", embedded)
    assert len(links) == 4 and all(x.startswith("data:image/png;base64,") for x in links)
    decoded = [base64.b64decode(x.split(",", 1)[1]) for x in links]
    assert decoded == [files[n] for n in ("results.png", "training.png", "training-tiny-clip.png",
                                          "training-tiny-cloob.png")]
    assert embed_images(md, {}) == md  # only the images given are embedded


def test_curves_of_runs_on_s3(s3, tmp_path):
    from cloob.results.arrange import build_report
    from cloob.results.training import gather, to_json

    if not s3.exists("curves-bucket"):
        s3.mkdir("curves-bucket")
    root = f"s3://curves-bucket/{uuid.uuid4().hex[:8]}"
    lines = _metrics(tmp_path, "clip")  # training uploads metrics.jsonl beside the checkpoints
    s3.put_file(str(tmp_path / "metrics.jsonl"), f"{root}/runs/r1/metrics.jsonl")
    append_rows(f"{root}/results", [_row("r1", "clip", s, "shapes", 0.1 * s / 50, f"{root}/runs/r1/checkpoints/step_{s:08d}")
                                    for s in (50, 100)])
    training = gather(build_report(f"{root}/results"))
    [run] = training.runs
    assert run.metrics_uri == f"{root}/runs/r1/metrics.jsonl" and not training.notes
    assert run.series["loss"] == [(rec["step"], pytest.approx(rec["loss"])) for rec in lines]
    assert json.loads(to_json(training))["runs"][0]["accuracy"] == {"shapes": [[50, pytest.approx(10.0)],
                                                                               [100, pytest.approx(20.0)]]}
