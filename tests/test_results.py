"""The results table (append-only parquet parts; concurrent writers on a folder and on S3; compaction)
and the `cloob results` report built from it.

Spawned writer processes import this module, so its top-level imports stay light.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloob.errors import CloobError
from cloob.results import table as results_table
from cloob.results.schema import SCHEMA
from cloob.results.table import append_rows, compact, read_rows

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(run: str = "run-a", ckpt: str = "c1", dataset: str = "imagenet", **kw) -> dict:
    base = {"run_id": run, "checkpoint_id": ckpt, "dataset": dataset, "task": "zeroshot", "method": "cloob",
            "arch": "RN50", "pretraining_data": "cc3m", "step": 1000, "n_images": 100, "n_skipped": 0,
            "n_classes": 10, "main_metric": "top1", "main_value": 0.5, "top1": 0.5, "top5": 0.8,
            "mean_per_class_recall": 0.49, "finished_at": T0, "row_uuid": uuid.uuid4().hex}
    return {**base, **kw}


def _writer(uri: str, worker: int, n: int, barrier) -> None:
    """A writer process: n single-row parts, starting when every writer is ready."""
    barrier.wait(60)
    for i in range(n):
        append_rows(uri, [_row(run=f"w{worker}", ckpt=f"c{i}", top1=i / 100)])


def _writers(uri: str, workers: int, per_worker: int) -> None:
    ctx = mp.get_context("spawn")  # children inherit os.environ: on S3 the endpoint and keys
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(uri, w, per_worker, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers


def _s3_prefix(s3) -> str:
    """A fresh prefix in this file's bucket (the moto server lives as long as the test session)."""
    if not s3.exists("results-tests-bucket"):
        s3.mkdir("results-tests-bucket")
    return f"s3://results-tests-bucket/{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------------- table

def test_round_trip(tmp_path):
    uri = str(tmp_path / "results")
    empty = read_rows(uri)
    assert len(empty) == 0 and empty.schema.equals(SCHEMA)  # nothing written yet: empty, not an error
    rows = [_row(dataset="imagenet", alignment=1.25, image_effective_eigenvalues=37,
                 started_at=T0 - timedelta(seconds=9), eval_settings='{"seed":0}', seconds=9.5),
            _row(dataset="cc3m-val", task="retrieval", step=None, main_metric="i2t_r1", main_value=0.1, top1=None,
                 i2t_r1=0.1, t2i_r10=0.4)]
    part = append_rows(uri, rows)
    assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{32}\.parquet", part.rsplit("/", 1)[1])
    assert (tmp_path / "results" / "parts" / part.rsplit("/", 1)[1]).is_file()
    back = {r["dataset"]: r for r in read_rows(uri).to_pylist()}
    for want in rows:
        got = back[want["dataset"]]
        assert {k: got[k] for k in want} == want
        assert all(got[k] is None for k in SCHEMA.names if k not in want)
    assert read_rows("file://" + uri).num_rows == 2  # any fsspec URL
    assert not list((tmp_path / "results" / "parts").glob(".*"))  # no temporary left behind


def test_unknown_column_and_wrong_type_are_refused(tmp_path):
    uri = str(tmp_path / "results")
    with pytest.raises(CloobError, match="accuracy"):
        append_rows(uri, [_row(accuracy=0.3)])
    with pytest.raises(CloobError, match="'step'"):
        append_rows(uri, [_row(step="one thousand")])
    with pytest.raises(CloobError, match="'top1'"):
        append_rows(uri, [_row(top1="high")])
    with pytest.raises(CloobError, match="'dataset'"):
        append_rows(uri, [_row(dataset=None)])
    assert read_rows(uri).num_rows == 0


def test_latest_keeps_the_newest_row_per_key(tmp_path):
    uri = str(tmp_path / "results")
    append_rows(uri, [_row(top1=0.3, finished_at=T0 + timedelta(hours=1)), _row(dataset="gtsrb", top1=0.1)])
    append_rows(uri, [_row(top1=0.2, finished_at=T0)])  # written later, but evaluated earlier
    # equal finished_at: the greater row_uuid wins (any fixed rule, so every reader agrees)
    append_rows(uri, [_row(dataset="gtsrb", top1=0.7, row_uuid="f" * 32), _row(dataset="gtsrb", top1=0.6,
                                                                                 row_uuid="0" * 32)])
    latest = {r["dataset"]: r["top1"] for r in read_rows(uri).to_pylist()}
    assert latest == {"imagenet": 0.3, "gtsrb": 0.7}
    assert read_rows(uri, latest=False).num_rows == 5


def test_concurrent_writers_on_a_folder(tmp_path):
    uri = str(tmp_path / "results")
    _writers(uri, workers=8, per_worker=5)
    rows = read_rows(uri).to_pylist()
    assert len(rows) == 40
    assert {(r["run_id"], r["checkpoint_id"]) for r in rows} == {(f"w{w}", f"c{i}") for w in range(8) for i in range(5)}
    assert len(list((tmp_path / "results" / "parts").iterdir())) == 40


def test_concurrent_writers_on_s3_and_compaction(s3):
    uri = _s3_prefix(s3) + "/results"
    assert read_rows(uri).num_rows == 0
    _writers(uri, workers=4, per_worker=3)
    assert read_rows(uri).num_rows == 12
    info = compact(uri)
    assert info["parts_before"] == 12 and info["rows"] == 12 and info["part"].startswith(uri + "/parts/")
    assert s3.ls(uri.removeprefix("s3://") + "/parts") == [info["part"].removeprefix("s3://")]
    assert {(r["run_id"], r["checkpoint_id"]) for r in read_rows(uri).to_pylist()} == \
        {(f"w{w}", f"c{i}") for w in range(4) for i in range(3)}


def test_compaction_while_a_writer_appends_loses_nothing(tmp_path):
    uri = str(tmp_path / "results")
    for i in range(5):
        append_rows(uri, [_row(run="before", ckpt=f"c{i}")])
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    writer = ctx.Process(target=_writer, args=(uri, 99, 15, barrier))
    writer.start()
    barrier.wait(60)
    rounds = 0
    while writer.is_alive():
        compact(uri)
        rounds += 1
    writer.join()
    assert writer.exitcode == 0 and rounds > 0
    info = compact(uri)
    assert info["rows"] == 20
    assert read_rows(uri).num_rows == 20
    assert [p.name for p in (tmp_path / "results" / "parts").iterdir()] == [info["part"].rsplit("/", 1)[1]]
    assert compact(uri) == {"parts_before": 1, "rows": 20, "part": info["part"]}  # one part: left as it is


def test_a_part_compacted_away_while_being_read_is_read_from_the_new_part(tmp_path, monkeypatch):
    """A reader lists [A, B]; a compaction publishes C = A + B and deletes A and B; the reader finds A
    gone and lists again, so it returns the rows once, not none."""
    uri = str(tmp_path / "results")
    append_rows(uri, [_row(ckpt="a")])
    append_rows(uri, [_row(ckpt="b")])
    list_parts = results_table._list_parts
    compacted = []

    def stale_listing(results):
        paths = list_parts(results)
        if not compacted:
            compacted.append(None)  # before compacting: compact lists the parts too
            compacted[0] = compact(uri)
        return paths

    monkeypatch.setattr(results_table, "_list_parts", stale_listing)
    rows = read_rows(uri, latest=False).to_pylist()
    assert compacted[0]["parts_before"] == 2
    assert sorted(r["checkpoint_id"] for r in rows) == ["a", "b"]


def test_a_part_with_fewer_columns_still_reads(tmp_path):
    parts = tmp_path / "results" / "parts"
    parts.mkdir(parents=True)
    # an older writer: some columns only, step as int32, and a column this version does not know
    pq.write_table(pa.table({"run_id": ["old"], "checkpoint_id": ["x"], "dataset": ["imagenet"],
                             "step": pa.array([5], pa.int32()), "top1": [0.4], "retired_column": ["?"]}),
                   parts / "20250101T000000-old.parquet")
    (parts / ".tmp-123-unfinished.parquet").write_bytes(b"half a file")  # a writer's temporary: ignored
    append_rows(str(tmp_path / "results"), [_row()])
    table = read_rows(str(tmp_path / "results"))
    assert table.schema.equals(SCHEMA)
    rows = {r["run_id"]: r for r in table.to_pylist()}
    assert rows["old"]["top1"] == 0.4 and rows["old"]["step"] == 5 and rows["old"]["alignment"] is None
    assert rows["run-a"]["top1"] == 0.5


# ------------------------------------------------------------------------------------------ report

def _paper_top1(pretraining: str, encoder: str, epochs: str, method: str, dataset: str) -> tuple[float, float | None]:
    from cloob.results.paper import load_paper

    for r in load_paper():
        if (r["pretraining"], r["encoder"], r["epochs"], r["method"], r["dataset"]) == (
                pretraining, encoder, epochs, method, dataset):
            return float(r["top1_percent"]), float(r["std_percent"]) if r["std_percent"] else None
    raise KeyError((pretraining, encoder, epochs, method, dataset))


# (run, checkpoint, method, step, pretraining) -> {dataset: main_value}
ZS = {
    ("cloob-rn50-cc3m", "k-cloob", "cloob", 1000, "cc3m"): {"imagenet": 0.25, "flowers102": 0.14},
    ("cloob-rn50-cc3m", "k-cloob-500", "cloob", 500, "cc3m"): {"imagenet": 0.11, "flowers102": 0.07},
    ("clip-rn50-cc3m", "k-clip", "clip", 1000, "cc3m"): {"imagenet": 0.21, "flowers102": 0.12},
    ("open_clip:RN50-quickgelu:rn50-yfcc15m.pt", "k-ext", "clip", None, "yfcc15m"): {"imagenet": 0.34,
                                                                                       "flowers102": 0.48},
}


def _report_rows() -> list[dict]:
    rows = []
    for (run, ckpt, method, step, pre), vals in ZS.items():
        arch = "RN50-quickgelu" if step is None else "RN50"
        for ds, v in vals.items():
            flowers = ds == "flowers102"
            rows.append(_row(run=run, ckpt=ckpt, dataset=ds, method=method, step=step, arch=arch,
                             pretraining_data=pre, main_metric="mean_per_class_recall" if flowers else "top1",
                             main_value=v, mean_per_class_recall=v if flowers else v - 0.01,
                             top1=v + 0.01 if flowers else v, n_images=100 if flowers else 500,
                             n_skipped=3 if flowers else 0, alignment=1.1, image_ajne=0.3,
                             image_effective_eigenvalues=40, checkpoint_uri=f"/runs/{run}/{ckpt}"))
    rows.append(_row(run="cloob-rn50-cc3m", ckpt="k-cloob", dataset="cc3m-val", task="retrieval", method="cloob",
                     main_metric="i2t_r1", main_value=0.1, top1=None, top5=None, mean_per_class_recall=None,
                     i2t_r1=0.1, i2t_r5=0.3, i2t_r10=0.4, t2i_r1=0.12, t2i_r5=0.31, t2i_r10=0.42, n_images=60))
    rows.reverse()  # the order written must not matter
    return rows


@pytest.fixture
def store(tmp_path) -> str:
    uri = str(tmp_path / "store" / "results")
    rows = _report_rows()
    append_rows(uri, rows[:4])
    append_rows(uri, rows[4:])
    return uri


def _col(report, prefix: str) -> int:
    [i] = [i for i, c in enumerate(report.zeroshot.columns) if c.startswith(prefix)]
    return i


def test_report_cloob_next_to_clip_with_the_paper(store):
    from cloob.results.arrange import build_report
    from cloob.results.paper import Ref
    from cloob.results.render import render_text

    rep = build_report(store)
    labels = [c.label for c in rep.checkpoints]
    assert labels[0].startswith("cloob RN50 cc3m step 500 (cloob-rn50-cc3m)")
    clip, cloob = _col(rep, "clip RN50 cc3m step 1000"), _col(rep, "cloob RN50 cc3m step 1000")
    assert cloob == clip + 1  # side by side, CLIP first
    ext = _col(rep, "clip RN50-quickgelu yfcc15m (rn50-yfcc15m.pt)")  # external weights: no step
    assert rep.zeroshot.columns[:2] == ["dataset", "metric"]
    # the percent cells are the rows' fractions (main metric per dataset)
    for (_run, ckpt, _method, _step, _pre), vals in ZS.items():
        i = next(j for j, c in enumerate(rep.checkpoints) if c.checkpoint_id == ckpt) + 2
        for ds, v in vals.items():
            assert rep.zeroshot.row(ds)[i] == pytest.approx(100 * v)
    assert rep.zeroshot.row("flowers102")[1] == "mean_per_class_recall"
    assert rep.zeroshot.row("imagenet")[ext] == pytest.approx(34.0)

    # auto: the pretraining and encoder of most checkpoints (cc3m RN50), the longest training (128)
    assert rep.paper == ("cc3m", "RN50", "128")
    for method in ("clip", "cloob"):
        col = rep.zeroshot.columns.index(f"paper {method.upper()} (cc3m RN50 128ep)")
        for ds in ("imagenet", "flowers102"):
            cell = rep.zeroshot.row(ds)[col]
            assert (cell.value, cell.std) == _paper_top1("cc3m", "RN50", "128", method, ds)
        mean = rep.zeroshot.row("mean")[col]
        assert mean.value == pytest.approx(sum(_paper_top1("cc3m", "RN50", "128", method, ds)[0]
                                               for ds in ("imagenet", "flowers102")) / 2)
    assert str(Ref(21.3, 0.42)) == "21.30 ±0.42"

    # the mean row: over both datasets, which every checkpoint has
    assert rep.zeroshot.row("mean")[cloob] == pytest.approx(100 * (0.25 + 0.14) / 2)
    assert rep.zeroshot.rows[-1][0] == "mean" and rep.zeroshot.summary_rows == 1
    assert rep.zeroshot.row("flowers102")[-2:] == [100, 3]  # images, skipped
    assert "flowers102: 3 unreadable image(s) skipped" in rep.notes
    assert any("the paper reports top-1 for all datasets" in n for n in rep.notes)

    # retrieval and diagnostics tables
    assert rep.retrieval.rows == [["cc3m-val", rep.zeroshot.columns[cloob], 10.0, 30.0, 40.0, 12.0, 31.0, 42.0, 60, 0]]
    diag = rep.diagnostics  # datasets in the paper's order: flowers102 before imagenet
    assert len(diag.rows) == 8 and diag.rows[0][:2] == [labels[0], "flowers102"]
    assert diag.rows[0][diag.columns.index("img eig")] == 40

    text = render_text(rep)
    assert "25.00" in text and "flowers102: 3 unreadable image(s) skipped" in text and "Retrieval" in text
    lines = text.splitlines()
    assert len({len(lines[i]) for i in range(len(lines)) if lines[i].startswith(("imagenet ", "flowers102 "))}) == 1


def test_runs_named_by_config_hash_are_ordered_by_method(tmp_path):
    """cloob train names runs <recipe>-<config hash>: the hash must not decide which column comes first."""
    from cloob.results.arrange import build_report

    uri = str(tmp_path / "results")
    for run, method in (("tiny-0a293b34db", "cloob"), ("tiny-fc6678aa8e", "clip")):
        append_rows(uri, [_row(run=run, ckpt=f"k-{method}", dataset="shapes", method=method, step=500,
                               arch="cloob-tiny-vit", pretraining_data="demo")])
    rep = build_report(uri, paper=None)
    assert [c.method for c in rep.checkpoints] == ["clip", "cloob"]


def test_report_metric_paper_choice_and_filters(store):
    from cloob.results.arrange import build_report

    top1 = build_report(store, metric="top1")
    assert top1.zeroshot.row("flowers102")[_col(top1, "cloob RN50 cc3m step 1000")] == pytest.approx(15.0)
    assert top1.zeroshot.row("flowers102")[1] == "top1"
    none = build_report(store, paper="none")
    assert none.paper is None and not [c for c in none.zeroshot.columns if c.startswith("paper")]
    yfcc = build_report(store, paper="yfcc15m:RN101")
    assert yfcc.paper == ("yfcc15m", "RN101", "")
    col = yfcc.zeroshot.columns.index("paper CLOOB (yfcc15m RN101)")
    assert yfcc.zeroshot.row("imagenet")[col].value == _paper_top1("yfcc15m", "RN101", "", "cloob", "imagenet")[0]
    assert yfcc.zeroshot.row("imagenet")[col].std is None
    assert build_report(store, paper="CC3M:rn50:31").paper == ("cc3m", "RN50", "31")
    with pytest.raises(CloobError, match="no numbers"):
        build_report(store, paper="cc3m:RN101")
    with pytest.raises(CloobError, match="PRETRAINING:ENCODER"):
        build_report(store, paper="cc3m")
    with pytest.raises(CloobError, match="metric"):
        build_report(store, metric="top3")

    only = build_report(store, datasets=["imagenet"], runs=["clip-*", "open_clip:*"])
    assert [r[0] for r in only.zeroshot.rows] == ["imagenet"]  # one dataset: no mean row
    assert [c.checkpoint_id for c in only.checkpoints] == ["k-clip", "k-ext"]
    assert not only.retrieval.rows
    with pytest.raises(CloobError, match="match"):
        build_report(store, runs=["nobody"])


def test_write_report_markdown_and_png(store, tmp_path):
    from PIL import Image

    from cloob.results.arrange import build_report
    from cloob.results.figure import render_png
    from cloob.results.render import render_markdown
    from cloob.results.report import write_report
    from cloob.results.training import gather

    rep = build_report(store)
    out = write_report(rep, str(tmp_path / "out"))
    assert out == {"markdown": str(tmp_path / "out" / "results.md"), "png": str(tmp_path / "out" / "results.png")}
    png = (tmp_path / "out" / "results.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    with Image.open(tmp_path / "out" / "results.png") as im:
        im.verify()
    with Image.open(tmp_path / "out" / "results.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300
    md = (tmp_path / "out" / "results.md").read_text()
    assert md == render_markdown(rep, training=gather(rep))
    # the fixture's checkpoints have no run folder: no curves, a note each (external weights: none)
    assert md.count("no training curves, no metrics.jsonl at") == 2 and "(rn50-yfcc15m.pt): no training" not in md
    assert "| imagenet | top1 |" in md and "| **mean** |" in md and "![" in md
    assert "paper CLOOB (cc3m RN50 128ep)" in md and "the paper reports top-1 for all datasets" in md
    assert "flowers102: 3 unreadable image(s) skipped" in md and md.count("## ") == 4
    # a report with retrieval rows only still gets a chart
    rt = build_report(store, datasets=["cc3m-val"])
    assert not rt.zeroshot.rows and render_png(rt)[:8] == PNG_MAGIC


def test_report_to_s3(s3, tmp_path):
    from cloob.results.arrange import build_report
    from cloob.results.report import write_report

    uri = _s3_prefix(s3) + "/results"
    append_rows(uri, _report_rows())
    out = write_report(build_report(uri), uri + "/report")
    assert out["png"] == uri + "/report/results.png"
    assert s3.cat_file(out["png"].removeprefix("s3://"))[:8] == PNG_MAGIC
    assert b"imagenet" in s3.cat_file(out["markdown"].removeprefix("s3://"))


def _args(*argv: str):
    import argparse

    from cloob.results.report import add_arguments

    parser = argparse.ArgumentParser(prog="cloob results")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_command_end_to_end(store, tmp_path, capsys):
    from cloob.results.report import run_command

    root = str(tmp_path / "store")
    assert run_command(_args("--store", root, "--metric", "top1", "--compact")) == 0
    out = capsys.readouterr().out
    assert "compacted 2 parts (9 rows)" in out
    assert "imagenet" in out and "flowers102" in out and "paper CLOOB" in out and "15.00" in out
    assert "cc3m-val" in out and "alignment" in out  # the retrieval and diagnostics tables
    assert f"wrote {root}/results/report/results.md" in out and f"{root}/results/report/results.png" in out
    assert (tmp_path / "store" / "results" / "report" / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert run_command(_args("--results", store, "--out", str(tmp_path / "elsewhere"), "--paper", "none",
                             "--dataset", "imagenet")) == 0
    assert "paper" not in capsys.readouterr().out.split("wrote")[0]
    assert (tmp_path / "elsewhere" / "results.md").is_file()


def test_empty_store_is_one_clear_error(tmp_path):
    from cloob.results.report import run_command

    with pytest.raises(CloobError, match="no results in") as e:
        run_command(_args("--store", str(tmp_path)))
    assert "cloob evaluate" in e.value.fix
