"""The results table under concurrent writers (processes, on a folder and on S3), and the
`cloob results` report built from it."""

import multiprocessing as mp
import uuid
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cloob import cli
from cloob.errors import CloobError
from cloob.results.report import build_report, load_paper, render_markdown, render_text, write_report, zero_shot_table
from cloob.results.table import append_rows, compact, read_rows

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _row(run="r", ckpt="c", dataset="d", **kw):
    base = {"run_id": run, "checkpoint_id": ckpt, "dataset": dataset, "task": "zeroshot", "method": "cloob",
            "arch": "RN50", "pretraining_data": "cc3m", "step": 100, "n_images": 10, "n_skipped": 0,
            "main_metric": "top1", "main_value": 0.5, "top1": 0.5, "finished_at": T0, "row_uuid": uuid.uuid4().hex}
    return {**base, **kw}


def _writer(uri: str, worker: int, n: int) -> None:
    for i in range(n):
        append_rows(uri, [_row(run=f"w{worker}", ckpt=f"c{i}", top1=worker + i / 100)])


def _hammer(uri: str, workers: int, per_worker: int) -> None:
    ctx = mp.get_context("spawn")  # children inherit os.environ: the S3 endpoint and keys
    procs = [ctx.Process(target=_writer, args=(uri, w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_round_trip_and_dedup_keeps_the_newest(tmp_path):
    uri = str(tmp_path / "results")
    assert len(read_rows(uri)) == 0  # nothing written yet: empty, not an error
    append_rows(uri, [_row(top1=0.1, finished_at=T0), _row(dataset="e", top1=0.3)])
    append_rows(uri, [_row(top1=0.2, finished_at=T0 + timedelta(seconds=1))])
    rows = {r["dataset"]: r for r in read_rows(uri).to_pylist()}
    assert rows["d"]["top1"] == 0.2 and rows["e"]["top1"] == 0.3 and rows["d"]["step"] == 100
    assert len(read_rows(uri, latest=False)) == 3


def test_bad_rows_are_refused_and_write_nothing(tmp_path):
    uri = str(tmp_path / "results")
    with pytest.raises(CloobError, match="unknown column"):
        append_rows(uri, [_row(accuracy=0.3)])
    with pytest.raises(CloobError, match="'step'"):
        append_rows(uri, [_row(step="one hundred")])
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.parquet"))


def test_concurrent_writers_on_a_folder_lose_no_row(tmp_path):
    uri = str(tmp_path / "results")
    _hammer(uri, workers=8, per_worker=5)
    rows = read_rows(uri).to_pylist()
    assert len(rows) == 40
    assert {(r["run_id"], r["checkpoint_id"]) for r in rows} == {(f"w{w}", f"c{i}") for w in range(8) for i in range(5)}


def test_concurrent_writers_on_s3_lose_no_row(s3):
    s3.mkdir("results-bucket")
    uri = "s3://results-bucket/store/results"
    _hammer(uri, workers=4, per_worker=3)
    assert len(read_rows(uri)) == 12
    assert compact(uri)["parts_before"] == 12
    assert len(read_rows(uri)) == 12 and len(s3.ls("results-bucket/store/results/parts")) == 1


def test_compaction_with_a_concurrent_writer_loses_nothing(tmp_path):
    uri = str(tmp_path / "results")
    for i in range(6):
        append_rows(uri, [_row(ckpt=f"c{i}")])
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_writer, args=(uri, 99, 10))
    p.start()
    while p.is_alive():
        compact(uri)
    p.join()
    compact(uri)
    assert len(read_rows(uri)) == 16
    assert len(list((tmp_path / "results" / "parts").glob("*.parquet"))) == 1


def test_a_part_from_an_older_writer_with_fewer_columns_still_reads(tmp_path):
    parts = tmp_path / "results" / "parts"
    parts.mkdir(parents=True)
    pq.write_table(pa.table({"run_id": ["old"], "checkpoint_id": ["x"], "dataset": ["d"], "top1": [0.4]}),
                   parts / "20250101T000000-old.parquet")
    append_rows(str(tmp_path / "results"), [_row()])
    rows = {r["run_id"]: r for r in read_rows(str(tmp_path / "results")).to_pylist()}
    assert rows["old"]["top1"] == 0.4 and rows["old"]["alignment"] is None and rows["r"]["top1"] == 0.5


def _paper(pretraining, encoder, epochs, method, dataset):
    for r in load_paper():
        if (r["pretraining"], r["encoder"], r["epochs"], r["method"], r["dataset"]) == (pretraining, encoder, epochs,
                                                                                       method, dataset):
            return r
    raise KeyError(dataset)


def _store(tmp_path):
    uri = str(tmp_path / "results")
    rows = []
    for method, ck, vals in (("cloob", "k1", (0.25, 0.03)), ("clip", "k2", (0.21, 0.02))):
        rows += [_row(run=f"{method}-run", ckpt=ck, method=method, dataset="imagenet", main_value=vals[0], top1=vals[0]),
                 _row(run=f"{method}-run", ckpt=ck, method=method, dataset="birdsnap", main_value=vals[1],
                      top1=vals[1], n_skipped=3 if method == "clip" else 0)]
    rows.append(_row(run="open_clip:RN50:x.pt", ckpt="k3", method="clip", pretraining_data="openai", step=None,
                     dataset="imagenet", main_value=0.6, top1=0.6))
    rows.append(_row(run="cloob-run", ckpt="k1", dataset="cc3m-val", task="retrieval", main_metric="i2t_r1",
                     main_value=0.1, top1=None, i2t_r1=0.1, t2i_r1=0.12, alignment=1.2, image_ajne=3.0))
    append_rows(uri, rows)
    return uri


def test_report_puts_cloob_next_to_clip_with_the_paper(tmp_path):
    rep = build_report(_store(tmp_path))
    header, body = zero_shot_table(rep)
    labels = header[2:]
    clip_i = next(i for i, h in enumerate(labels) if h.startswith("clip RN50 cc3m"))
    cloob_i = next(i for i, h in enumerate(labels) if h.startswith("cloob RN50 cc3m"))
    assert abs(clip_i - cloob_i) == 1  # adjacent
    assert rep.paper == ("cc3m", "RN50", "128")  # the checkpoints' own pretraining/encoder, longest run
    table = {r[0]: r for r in body}
    assert table["imagenet"][2 + cloob_i] == "25.00" and table["birdsnap"][2 + clip_i] == "2.00"
    paper_clip = _paper("cc3m", "RN50", "128", "clip", "imagenet")
    assert table["imagenet"][header.index("paper CLIP (cc3m RN50 128ep)")] == \
        f"{float(paper_clip['top1_percent']):.2f} ±{float(paper_clip['std_percent']):.2f}"
    # the mean row covers only the datasets every checkpoint has: imagenet
    assert "mean" not in " ".join(r[0] for r in body)
    text = render_text(rep)
    assert "Retrieval" in text and "cc3m-val" in text and "3 unreadable image(s) skipped" in text
    assert build_report(_store(tmp_path / "b"), paper="none").paper is None
    explicit = build_report(_store(tmp_path / "c"), paper="yfcc15m:RN101")
    assert explicit.paper == ("yfcc15m", "RN101", "")
    with pytest.raises(CloobError, match="no numbers"):
        build_report(_store(tmp_path / "d"), paper="cc3m:RN101")


def test_report_files_and_cli(tmp_path, capsys):
    uri = _store(tmp_path)
    written = write_report(build_report(uri), str(tmp_path / "out"))
    png = (tmp_path / "out" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(tmp_path / "out" / "results.png").size[0] > 500
    assert "| imagenet |" in (tmp_path / "out" / "results.md").read_text() and written["png"].endswith(".png")
    assert render_markdown(build_report(uri)).count("## ") == 3
    assert cli.main(["results", "--results", uri, "--metric", "top1"]) == 0
    out = capsys.readouterr().out
    assert "paper CLOOB" in out and "results.md" in out
    assert cli.main(["results", "--store", str(tmp_path / "empty")]) == 2
    assert "no results" in capsys.readouterr().err
