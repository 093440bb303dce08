"""Checkpoint integrity and housekeeping: every file's digest in meta.json, checked on resume (one
error naming the file and the older checkpoint to fall back to); checkpoints from before the digests
still load; temp files left by a kill are swept at the next start; where the default run folder is."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import child_env

from cloob.config import load_recipe
from cloob.errors import CloobError
from cloob.train.checkpoint import CONFIG_FILE, META_FILE, MODEL_FILE, STATE_FILE, CheckpointStore


def _save(run_dir: Path, step: int, seed: int = 0):
    """A checkpoint written by the trainer's own save (small tensors stand in for a model)."""
    g = torch.Generator().manual_seed(seed + step)
    return CheckpointStore(str(run_dir)).save(
        step, {"w": torch.randn(64, generator=g)}, {"model_cfg": {}},
        {"step": step, "optimizer": {"m": torch.randn(256, generator=g)}},
        {"arch": "cloob-tiny-vit", "method": "cloob", "run_name": run_dir.name}, keep=5)


def _flip_byte(path: Path, at: float = 0.5) -> None:
    b = bytearray(path.read_bytes())
    b[int(len(b) * at)] ^= 0x40
    path.write_bytes(bytes(b))


def _train_argv(shards, out, *extra):
    return ["train", "tiny", f"data.train={shards}", f"train.output={out}", "train.batch_size=8",
            "train.steps=40", "data.workers=0", "train.progress=false", "train.run_name=r", *extra]


def test_meta_holds_every_files_digest(tmp_path):
    ref = _save(tmp_path / "run", 10)
    folder = Path(ref.url)
    meta = json.loads((folder / META_FILE).read_text())
    assert set(meta["files"]) == {MODEL_FILE, CONFIG_FILE, STATE_FILE}
    import hashlib

    for name, d in meta["files"].items():
        data = (folder / name).read_bytes()
        assert d == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert meta["model_sha256"] == meta["files"][MODEL_FILE]["sha256"]  # the checkpoint id stays


def _train(shards, out, *extra) -> dict:
    """The trainer in this process (as each rank runs it); its CloobErrors are what `cloob train`
    prints as one error and fix (the printing: tests/test_launch.py)."""
    from cloob.train import train

    return train(load_recipe("tiny", _train_argv(shards, out, *extra)[2:]))


@pytest.mark.slow
def test_flipped_byte_in_train_state_refuses_resume_naming_the_file_and_the_fallback(tmp_path, shards_dir):
    run = tmp_path / "out" / "runs" / "r"
    _save(run, 10)
    damaged = Path(_save(run, 20).url)
    _flip_byte(damaged / STATE_FILE)
    with pytest.raises(CloobError) as e:
        _train(shards_dir, tmp_path / "out")
    assert f"{damaged}/{STATE_FILE}" in e.value.problem and "sha256" in e.value.problem
    # The fix names the damaged folder, how to move it aside, and the step a rerun then resumes from.
    assert f"mv {damaged} " in e.value.fix and "step 10" in e.value.fix
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # nothing written

    with pytest.raises(CloobError, match=STATE_FILE):
        CheckpointStore.load(CheckpointStore(str(run)).latest())


@pytest.mark.slow
def test_missing_train_state_refuses_resume(tmp_path, shards_dir):
    run = tmp_path / "out" / "runs" / "r"
    (Path(_save(run, 10).url) / STATE_FILE).unlink()
    with pytest.raises(CloobError) as e:
        _train(shards_dir, tmp_path / "out")
    assert STATE_FILE in e.value.problem and "missing" in e.value.problem
    assert "no older complete checkpoint" in str(e.value)


def test_flipped_byte_in_the_model_file_refuses_load(tmp_path):
    ref = _save(tmp_path / "run", 10)
    _flip_byte(Path(ref.url) / MODEL_FILE)
    with pytest.raises(CloobError, match=MODEL_FILE):
        CheckpointStore.load(ref)


def test_checkpoint_from_before_the_digests_still_loads(tmp_path):
    """meta.json written before per-file digests: the model file's sha256 is still checked."""
    ref = _save(tmp_path / "run", 10)
    meta_path = Path(ref.url) / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    model, state, loaded = CheckpointStore.load(ref)
    assert state["step"] == 10 and loaded["step"] == 10 and set(model) == {"w"}
    _flip_byte(Path(ref.url) / MODEL_FILE)
    with pytest.raises(CloobError, match=MODEL_FILE):
        CheckpointStore.load(ref)
    _flip_byte(Path(ref.url) / MODEL_FILE)  # flipped back: intact again
    assert CheckpointStore.load(ref)[2]["step"] == 10
    (Path(ref.url) / STATE_FILE).unlink()
    with pytest.raises(CloobError, match=STATE_FILE):
        CheckpointStore.load(ref)


def test_unreadable_meta_is_one_clear_error(tmp_path):
    ref = _save(tmp_path / "run", 10)
    (Path(ref.url) / META_FILE).write_text("{not json")
    with pytest.raises(CloobError, match=META_FILE):
        CheckpointStore.load(ref)


def test_default_run_folder_is_runs_slash_run_name():
    """`cloob train tiny data.train=./shards` writes ./runs/<run>, not ./runs/runs/<run>; the output
    location is not part of the recipe hash, so the run name (and resume elsewhere) is unchanged."""
    r = load_recipe("tiny", ["data.train=./shards"])
    assert r.run_dir() == f"./runs/{r.run_id()}"
    # The tiny recipe's hash as it was before (a changed hash would restart every run).
    assert r.content_hash() == "02a89a7615241d483e11e4158d2aa3881956e59d7184edaf9acae0620f59bd91"
    assert load_recipe("tiny", ["data.train=./shards", "train.output=/store"]).run_dir() == \
        f"/store/runs/{r.run_id()}"


def test_run_names_say_the_method_and_what_the_command_line_changed():
    """CLOOB and CLIP runs of one recipe are told apart by name; the name is the same on every load
    (a rerun resumes the same folder) and survives a dump and reload of the recipe."""
    base = ["data.train=./shards", "train.output=/store"]
    cloob, clip = load_recipe("tiny", base), load_recipe("tiny", [*base, "loss.method=clip"])
    assert cloob.run_id() == f"tiny-cloob-{cloob.content_hash()[:10]}"
    assert clip.run_id() == f"tiny-clip-{clip.content_hash()[:10]}"
    assert load_recipe("tiny", [*base, "loss.method=clip"]).run_id() == clip.run_id()
    swept = load_recipe("tiny", [*base, "train.steps=500", "loss.beta=8", "train.progress=false"])
    assert swept.run_id() == f"tiny-cloob-steps500-beta8-{swept.content_hash()[:10]}"
    assert load_recipe(swept.model_dump(mode="json")).run_id() == swept.run_id()
    assert load_recipe("tiny", [*base, "train.run_name=mine"]).run_id() == "mine"
    long = load_recipe("tiny", [*base, *(f"optim.{k}=0.123456789" for k in ("lr", "weight_decay", "eps"))])
    assert len(long.run_id()) <= len("tiny-cloob--") + 32 + 10


@pytest.mark.slow
def test_temp_files_of_a_killed_write_are_swept_at_the_next_start(tmp_path, shards_dir):
    """A kill in the middle of an atomic write leaves '.tmp-<random>-<name>' files; the next start of
    the run removes them (ours only: other files stay)."""
    run = tmp_path / "out" / "runs" / "r"
    half = run / "checkpoints" / "step_00000004"  # a checkpoint killed mid-write: no meta.json
    half.mkdir(parents=True)
    planted = [half / f".tmp-x-{MODEL_FILE}", run / ".tmp-k2j4_9ab-recipe.yaml"]
    for p in planted:
        p.write_bytes(b"\0" * 1000)
    kept = [run / "notes.tmp", run / "tmp-notes.txt", tmp_path / "out" / ".tmp-y-other"]
    for p in kept:
        p.write_text("the user's")
    _train(shards_dir, tmp_path / "out", "train.steps=2", "train.checkpoint_every=1")
    assert not any(p.exists() for p in planted)
    assert all(p.exists() for p in kept)
    assert not list(run.rglob(".tmp-*"))
    assert CheckpointStore(str(run)).latest().step == 2


@pytest.mark.slow
def test_damaged_train_state_of_a_real_run_is_refused_and_the_fix_works(tmp_path, shards_dir, capsys):
    """The fault report's recipe (flip a byte in train_state.pt, rerun: rc was 0 and the final model
    drifted), then what the error says to do: move the damaged step aside and rerun. That resumes from
    the older checkpoint and ends with the same model as the undamaged run."""
    import shutil

    extra = ("train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    _train(shards_dir, tmp_path / "out", *extra)
    run = tmp_path / "out" / "runs" / "r"
    store = CheckpointStore(str(run))
    final_sha = store.latest().meta()["model_sha256"]
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if killed during step 4
    damaged = run / "checkpoints" / "step_00000003"
    _flip_byte(damaged / STATE_FILE)

    with pytest.raises(CloobError) as e:
        _train(shards_dir, tmp_path / "out", *extra)
    assert f"{damaged}/{STATE_FILE}" in e.value.problem and "step 2" in e.value.fix
    fix = e.value.fix
    mv = fix[fix.index("mv "):].split(";")[0].split(")")[0].split()
    assert mv[:2] == ["mv", str(damaged)] and len(mv) == 3
    subprocess.run(mv, check=True)

    capsys.readouterr()
    assert _train(shards_dir, tmp_path / "out", *extra)["step"] == 4
    assert "resuming from step 2" in capsys.readouterr().err
    assert store.latest().step == 4 and store.latest().meta()["model_sha256"] == final_sha


def test_checkpoint_files_keep_their_byte_form(tmp_path):
    """meta.json and open_clip_config.json are json.dumps(..., indent=2) with ASCII escapes, byte for
    byte as every earlier version wrote them (readers and digests depend on it)."""
    cfg = {"model_cfg": {"embed_dim": 8, "name": "é"}, "preprocess_cfg": {"mean": [0.5, 0.25]}}
    ref = CheckpointStore(str(tmp_path / "run")).save(7, {"w": torch.zeros(2)}, cfg, {"step": 7},
                                                      {"arch": "cloob-tiny-vit", "metrics": {"loss": 0.5}}, keep=1)
    folder = Path(ref.url)
    assert folder == tmp_path / "run" / "checkpoints" / "step_00000007"
    assert (folder / CONFIG_FILE).read_bytes() == json.dumps(cfg, indent=2).encode()
    meta = json.loads((folder / META_FILE).read_bytes())
    assert list(meta)[:3] == ["arch", "metrics", "step"] and list(meta)[-1] == "id"
    assert (folder / META_FILE).read_bytes() == json.dumps(meta, indent=2).encode()


def test_checkpoints_written_by_another_process_are_seen_on_s3(s3):
    """The supervisor lists a run's checkpoints while torchrun's ranks (other processes) write new
    ones: every listing is read afresh from the object store, and pruning sees them too."""
    s3.mkdir("ckpt-bucket")
    run = "s3://ckpt-bucket/runs/r"
    store = CheckpointStore(run)
    assert store.latest() is None
    first = store.save(1, {"w": torch.zeros(2)}, {"model_cfg": {}}, {"step": 1}, {"arch": "cloob-tiny-vit"}, keep=5)
    assert first.url == f"{run}/checkpoints/step_00000001" and store.latest() == first
    # Another process's save of step 2: the same objects under the next step folder.
    for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE, META_FILE):
        data = s3.cat(f"ckpt-bucket/runs/r/checkpoints/step_00000001/{name}")
        s3.pipe(f"ckpt-bucket/runs/r/checkpoints/step_00000002/{name}", data)
    assert [r.step for r in store.complete()] == [1, 2]
    assert store.latest().url == f"{run}/checkpoints/step_00000002"
    store.save(3, {"w": torch.ones(2)}, {"model_cfg": {}}, {"step": 3}, {"arch": "cloob-tiny-vit"}, keep=1)
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("ckpt-bucket/runs/r/checkpoints", refresh=True)) == \
        ["step_00000003"]
    model, state, meta = CheckpointStore.load(CheckpointStore(run).latest())
    assert meta["step"] == 3 and state == {"step": 3} and torch.equal(model["w"], torch.ones(2))


def test_the_readmes_run_names_are_the_ones_cloob_train_gives():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for method in ("cloob", "clip"):
        name = load_recipe("tiny", ["data.train=./shards", "train.steps=500", f"loss.method={method}"]).run_id()
        assert f"runs/{name}" in readme or f"`{name}`" in readme, name


class _WritesMarker:
    """What a hostile run folder's train_state.pt can hold: unpickling it calls exec (fault report B1)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'a').write('pwned')",)


def _plant(ck: Path, name: str, payload) -> None:
    """Adds payload to the checkpoint file `name` and rewrites meta.json's digests to match, as whoever
    can write the run folder can."""
    import hashlib

    obj = torch.load(ck / name, weights_only=False)
    obj["evil"] = payload
    torch.save(obj, ck / name)
    meta = json.loads((ck / META_FILE).read_text())
    data = (ck / name).read_bytes()
    meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if name == MODEL_FILE:
        meta["model_sha256"], meta["model_bytes"] = meta["files"][name]["sha256"], len(data)
    (ck / META_FILE).write_text(json.dumps(meta, indent=2))


@pytest.mark.slow
def test_a_train_state_that_would_run_code_is_refused_on_resume_and_nothing_runs(tmp_path, shards_dir):
    """Resume loads train_state.pt as plain data only (weights_only): a pickle that calls exec is one
    error + fix from `cloob train`, and the marker it would write never appears."""
    import sys

    extra = ("train.steps=3", "train.checkpoint_every=2")
    _train(shards_dir, tmp_path / "out", *extra)  # a real run's checkpoint at step 2, then 3
    run = tmp_path / "out" / "runs" / "r"
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000003")
    ck = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "PWNED"
    _plant(ck, STATE_FILE, _WritesMarker(marker))

    proc = subprocess.run([sys.executable, "-m", "cloob.cli", *_train_argv(shards_dir, tmp_path / "out", *extra)],
                          capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines if "error:" in line or "fix:" in line] == ["error", "  fix"], lines
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr
    error = next(line for line in lines if line.startswith("error:"))
    assert f"{ck}/{STATE_FILE}" in error and "exec" in error and "nothing of it ran" in error
    assert not (ck.parent / "step_00000003").exists()  # nothing trained


def test_a_train_state_with_a_foreign_object_is_refused_by_load(tmp_path):
    ref = _save(tmp_path / "run", 10)
    marker = tmp_path / "PWNED"
    _plant(Path(ref.url), STATE_FILE, _WritesMarker(marker))
    with pytest.raises(CloobError) as e:
        CheckpointStore.load(ref)
    assert not marker.exists() and "\x1b" not in str(e.value)
    assert "exec" in e.value.problem and "not plain data" in e.value.problem


def test_the_training_state_the_trainer_saves_loads_as_plain_data(tmp_path):
    """RNG states (Python's tuple, NumPy's array, torch's tensor) and an optimizer's state survive the
    weights_only load exactly."""
    import random

    import numpy as np

    from cloob.train.run_state import rng_state

    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random(), np.random.normal(), torch.rand(1)  # noqa: B018 -- a cached gaussian in the numpy state
    state = {"optimizer": opt.state_dict(), "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
             "step": 10, "ranks": [{"rng": rng_state(), "stream": {"raw_consumed": {0: 3}, "batches": 1, "skips": {}}}]}
    ref = CheckpointStore(str(tmp_path / "run")).save(10, {"w": torch.zeros(2)}, {}, state, {"arch": "x"}, keep=1)
    _, loaded, _ = CheckpointStore.load(ref)
    rng = loaded["ranks"][0]["rng"]
    assert rng["python"] == state["ranks"][0]["rng"]["python"]
    saved_np = state["ranks"][0]["rng"]["numpy"]
    assert rng["numpy"][0] == saved_np[0] and (rng["numpy"][1] == saved_np[1]).all() and rng["numpy"][2:] == saved_np[2:]
    assert torch.equal(rng["torch"], state["ranks"][0]["rng"]["torch"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
