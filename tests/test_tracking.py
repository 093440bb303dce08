"""Tracking backends (train.report_to, cloob/train/tracking.py): a tiny CPU training with TensorBoard
and W&B (offline, no account), resumed once, then its checkpoints evaluated; what lands in the event
files and in W&B's offline record; the errors; a backend failing mid-run; a run folder on S3.

W&B's offline record (offline-run-*/run-*.wandb) is an internal format: `_wandb_records` reads it the
way wandb 0.31.0 (the locked version) writes it (a 7-byte header, LevelDB log framing of protobuf
`Record`s). If a wandb upgrade changes the format these tests fail in that parser: check it there.
"""

import json
import shutil
import struct
import uuid
from pathlib import Path

import pytest
import yaml

from cloob import cli
from cloob.config import load_recipe
from cloob.data import synthetic
from cloob.errors import CloobError
from cloob.results.table import read_rows
from cloob.train import tracking
from cloob.train.checkpoint import CheckpointStore
from cloob.train.metrics import MetricsLogger

RUN = "trk"
_TRAIN = ["train.batch_size=16", "train.steps=6", "train.checkpoint_every=3", "train.log_every=1",
          "data.workers=0", "data.shuffle_buffer=32", "train.progress=false", "schedule.warmup_steps=2",
          "train.keep_checkpoints=3"]


def _offline_wandb(mp: pytest.MonkeyPatch, home: Path) -> None:
    """W&B offline, everything it writes outside the run folder under `home` (none in ~)."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_PROJECT", "cloob-tests")
    mp.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        mp.setenv(var, str(home / sub))
    for var in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        mp.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A run with report_to=tensorboard,wandb: 6 steps, a checkpoint every 3; its last checkpoint
    removed and the run resumed from step 3 (a second W&B session of the same id); then both
    checkpoints evaluated on a generated zero-shot set by `cloob evaluate`."""
    from cloob.train import train

    tmp = tmp_path_factory.mktemp("tracking")
    shards = tmp / "shards"
    synthetic.write_shards(shards, 64, shard_size=32, image_size=32, seed=5)
    folders = tmp / "shapes"
    synthetic.write_class_folders(folders, per_class=2, image_size=32, seed=6)
    overrides = [f"data.train={shards}", f"train.output={tmp}", f"train.run_name={RUN}",
                 "train.report_to=tensorboard,wandb", *_TRAIN]
    with pytest.MonkeyPatch.context() as mp:
        _offline_wandb(mp, tmp / "wandb-home")
        train(load_recipe("tiny", overrides))
        run_dir = tmp / "runs" / RUN
        first = _metrics(run_dir)
        store = CheckpointStore(str(run_dir))
        shutil.rmtree(store.latest().url)  # as if the run had been killed after step 5
        summary = train(load_recipe("tiny", overrides))
        assert summary["step"] == 6
        ckpts = [c.url for c in store.complete()]
        argv = ["evaluate", *ckpts, "--data", f"shapes={folders}", "--store", str(tmp / "store"), "--no-progress",
                "--workers", "0"]
        assert cli.main(argv) == 0
    rows = read_rows(str(tmp / "store" / "results")).to_pylist()
    return {"run_dir": run_dir, "first": first, "rows": rows,
            "recipe": yaml.safe_load((run_dir / "recipe.yaml").read_text())}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tb_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path) -> list:
    """The protobuf Records of one offline run file, as wandb 0.31.0 writes it: ':W&B', 2 magic bytes and
    a version byte, then the LevelDB log format (32 KiB blocks; chunks of crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb 0.31.0 offline record (header {data[:7]!r})"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_sessions(run_dir: Path) -> list[dict]:
    """Each offline session in the run folder: its run record (id, name, project, job type, start,
    config) and its history rows, in the order the sessions started."""
    import wandb

    wandb.teardown()  # a run's file is whole once wandb's service has ended (finish() does not wait)
    sessions = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        s = {"file": f, "history": []}
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                s.update(id=r.run.run_id, name=r.run.display_name, project=r.run.project, job=r.run.job_type,
                         started=(r.run.start_time.seconds, r.run.start_time.nanos),
                         config={i.key: json.loads(i.value_json) for i in r.run.config.update if i.key != "_wandb"})
            elif kind == "history":
                s["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        sessions.append(s)
    return sorted(sessions, key=lambda s: s["started"])  # folder names have whole seconds only


def test_training_and_zero_shot_are_in_the_runs_tensorboard(tracked):
    scalars = _tb_scalars(tracked["run_dir"] / "tensorboard")
    final = {m["step"]: m for m in _metrics(tracked["run_dir"])}
    assert sorted(final) == [1, 2, 3, 4, 5, 6]
    # The training scalars, one trajectory after the resume (purge_step), equal to metrics.jsonl.
    assert scalars["train/loss"] == pytest.approx({s: m["loss"] for s, m in final.items()})
    assert scalars["data/skipped"] == {s: float(m["skipped"]) for s, m in final.items()}
    # The zero-shot results at each checkpoint's step, equal to the results table's rows.
    rows = {r["step"]: r for r in tracked["rows"]}
    assert sorted(rows) == [3, 6]
    for k in ("top1", "top5"):
        assert scalars[f"zeroshot/shapes/{k}"] == pytest.approx({s: r[k] for s, r in rows.items()})


def test_the_wandb_run_has_the_runs_name_recipe_history_and_zero_shot(tracked):
    sessions = _wandb_sessions(tracked["run_dir"])
    # training, its resume, and one evaluation per checkpoint: four sessions of one W&B run
    assert [s["job"] for s in sessions] == ["train", "train", "eval", "eval"]
    assert {s["id"] for s in sessions} == {tracking.wandb_run_id(RUN)}
    assert {s["name"] for s in sessions} == {RUN} and {s["project"] for s in sessions} == {"cloob-tests"}
    assert sessions[0]["config"] == tracked["recipe"]  # the recipe, as recipe.yaml holds it
    assert sessions[0]["config"]["train"]["report_to"] == ["tensorboard", "wandb"]

    def steps(session, key):
        return {h["global_step"]: h[key] for h in session["history"] if key in h}

    first = {m["step"]: m["loss"] for m in tracked["first"]}
    assert steps(sessions[0], "train/loss") == pytest.approx(first)
    resumed = {m["step"]: m["loss"] for m in _metrics(tracked["run_dir"]) if m["step"] > 3}
    assert steps(sessions[1], "train/loss") == pytest.approx(resumed)  # from the step after the resume
    rows = {r["step"]: r for r in tracked["rows"]}
    logged = {**steps(sessions[2], "zeroshot/shapes/top1"), **steps(sessions[3], "zeroshot/shapes/top1")}
    assert logged == pytest.approx({s: r["top1"] for s, r in rows.items()})


def test_an_unknown_backend_is_one_error_naming_the_known_ones(tmp_path):
    with pytest.raises(CloobError, match=r"train.report_to.*unknown tracking backend 'mlflow' \(known: "
                                         r"tensorboard, wandb\)"):
        load_recipe("tiny", ["train.report_to=tensorboard,mlflow"])
    with pytest.raises(CloobError, match="unknown tracking backend 'tensorbaord'") as e:
        MetricsLogger(tmp_path, report_to="tensorbaord")
    assert "train.report_to=tensorboard,wandb" in e.value.fix
    assert not (tmp_path / "metrics.jsonl").exists()


def test_report_to_changes_neither_the_recipe_hash_nor_the_run_name():
    base = load_recipe("tiny")
    assert base.train.report_to == ["tensorboard"]  # the default: as before report_to existed
    for value in ("wandb", "tensorboard,wandb", "none", "[wandb, tensorboard]"):
        r = load_recipe("tiny", [f"train.report_to={value}"])
        assert r.content_hash() == base.content_hash() and r.train.run_name == base.train.run_name, value
    assert load_recipe("tiny", ["train.report_to=none"]).train.report_to == []
    assert load_recipe("tiny", ["train.report_to=WandB, tensorboard"]).train.report_to == ["wandb", "tensorboard"]


class _Flaky:
    """A backend that takes `good` calls of log and then fails as a lost connection would."""

    logged: list = []

    def __init__(self, ctx, good=2):
        self.good = good
        self.closed = False

    def log(self, step, scalars):
        if self.good == 0:
            raise ConnectionError("the tracking server went away")
        self.good -= 1
        _Flaky.logged.append((step, dict(scalars)))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_a_backend_failing_mid_run_is_dropped_with_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(tracking.SINKS, "flaky", _Flaky)
    _Flaky.logged = []
    m = MetricsLogger(tmp_path, report_to="flaky,tensorboard", run_name="r")
    with caplog.at_level("WARNING", logger="cloob.train.metrics"):
        for step in range(1, 6):
            m.log(step, {"loss": 1.0 / step, "skipped": 0})
        m.flush()
    assert m.sinks == ["tensorboard"]
    m.close()
    m.close()  # once is enough; twice does nothing
    assert [s for s, _ in _Flaky.logged] == [1, 2]
    assert _Flaky.logged[0][1] == {"train/loss": 1.0, "data/skipped": 0}  # the backends' tags
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "flaky failed (ConnectionError: the tracking server went away)" in warnings[0]
    assert [x["step"] for x in _metrics(tmp_path)] == [1, 2, 3, 4, 5]  # the contract has every step
    assert sorted(_tb_scalars(tmp_path / "tensorboard")["train/loss"]) == [1, 2, 3, 4, 5]


def test_wandb_that_cannot_start_fails_training_at_the_start_and_only_warns_in_evaluation(
        tmp_path, monkeypatch, make_random_checkpoint, caplog):
    _offline_wandb(monkeypatch, tmp_path / "wandb-home")
    monkeypatch.setenv("WANDB_MODE", "online")  # no API key here, and no server to reach
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(CloobError, match="wandb could not start the run's W&B record") as e:
        MetricsLogger(tmp_path / "run", report_to="tensorboard,wandb", run_name="r")
    assert "WANDB_MODE=offline" in e.value.fix and "leave wandb out of train.report_to" in e.value.fix
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    run = tmp_path / "runs" / "r"
    make_random_checkpoint(run, seed=1, step=4, run_name="r")
    recipe = load_recipe("tiny", ["train.report_to=tensorboard,wandb"]).model_dump(mode="json")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with caplog.at_level("WARNING", logger="cloob.train.tracking"):
        written = tracking.log_evaluation(str(run), 4, "r", {"zeroshot/shapes/top1": 0.25})
    assert written == ["tensorboard"]
    assert "was not logged to wandb: wandb could not start" in caplog.text
    assert _tb_scalars(run / "tensorboard") == {"zeroshot/shapes/top1": {4: 0.25}}


def test_a_run_asking_for_tensorboard_only_never_opens_wandb(tmp_path, monkeypatch, make_random_checkpoint):
    def no_wandb(ctx):
        raise AssertionError("wandb opened for a run that did not ask for it")

    monkeypatch.setitem(tracking.SINKS, "wandb", no_wandb)
    run = tmp_path / "runs" / "r"
    make_random_checkpoint(run, seed=1, step=2, run_name="r")
    recipe = load_recipe("tiny").model_dump(mode="json")
    del recipe["train"]["report_to"]  # a run written before report_to existed: the default, TensorBoard
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert tracking.log_evaluation(str(run), 2, "r", {"zeroshot/shapes/top1": 0.5}) == ["tensorboard"]
    MetricsLogger(tmp_path / "train", report_to=["tensorboard"], run_name="r").close()
    # A folder that is not a run of `cloob train` (no recipe.yaml) gets nothing written.
    bare = tmp_path / "bare"
    make_random_checkpoint(bare, seed=1, step=2)
    assert tracking.log_evaluation(str(bare), 2, "rand", {"zeroshot/shapes/top1": 0.5}) == []
    assert not (bare / "tensorboard").exists()


def test_evaluating_a_run_on_s3_adds_its_event_file_to_the_run_folder(s3, tmp_path, make_random_checkpoint):
    """TensorBoard's writer cannot append to an object: the evaluation's event file is written
    locally and copied into the run folder on the store."""
    bucket = f"tracking-{uuid.uuid4().hex[:10]}"  # the S3 server is shared by every test of this process
    s3.mkdir(bucket)
    run = f"s3://{bucket}/runs/r"
    make_random_checkpoint(run, seed=1, step=5, run_name="r")
    recipe = load_recipe("tiny").model_dump(mode="json")
    s3.pipe(f"{bucket}/runs/r/recipe.yaml", yaml.safe_dump(recipe).encode())
    folders = tmp_path / "shapes"
    synthetic.write_class_folders(folders, per_class=1, image_size=32, seed=6)
    assert cli.main(["evaluate", run, "--data", f"shapes={folders}", "--store", str(tmp_path / "store"),
                     "--no-progress", "--workers", "0"]) == 0
    row = read_rows(str(tmp_path / "store" / "results")).to_pylist()[0]
    events = s3.ls(f"{bucket}/runs/r/tensorboard")
    assert len(events) == 1 and "tfevents" in events[0]
    local = tmp_path / "tb"
    local.mkdir()
    s3.get(events[0], str(local / Path(events[0]).name))
    scalars = _tb_scalars(local)
    assert set(scalars) == {"zeroshot/shapes/top1", "zeroshot/shapes/top5"}
    for k in ("top1", "top5"):
        assert scalars[f"zeroshot/shapes/{k}"] == pytest.approx({5: row[k]})


def test_the_recipe_reaches_wandb_without_url_credentials(tmp_path, monkeypatch):
    _offline_wandb(monkeypatch, tmp_path / "wandb-home")
    recipe = load_recipe("tiny", ["data.train=s3://AKIAKEY:s3cr3t@bucket/shards?X-Amz-Signature=abc"])
    config = recipe.model_dump(mode="json")
    sink = tracking.WandbSink(tracking.RunContext(name="r", log_dir=tmp_path, config=config))
    sink.log(1, {"train/loss": 2.0})
    sink.close()
    (session,) = _wandb_sessions(tmp_path)
    assert session["config"]["data"]["train"] == "s3://bucket/shards"
    assert session["config"]["model"] == config["model"]
    assert b"s3cr3t" not in session["file"].read_bytes()
