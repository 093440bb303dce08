"""Checkpoints and run folders: where the default run folder is."""

from cloob.config import load_recipe


def test_default_run_folder_is_runs_slash_run_name():
    """`cloob train tiny data.train=./shards` writes ./runs/<run>, not ./runs/runs/<run>; the output
    location is not part of the recipe hash, so the run name (and resume elsewhere) is unchanged."""
    r = load_recipe("tiny", ["data.train=./shards"])
    assert r.run_dir() == f"./runs/{r.run_id()}"
    # The tiny recipe's hash as it was before (a changed hash would restart every run).
    assert r.content_hash() == "02a89a7615241d483e11e4158d2aa3881956e59d7184edaf9acae0620f59bd91"
    assert load_recipe("tiny", ["data.train=./shards", "train.output=/store"]).run_dir() == \
        f"/store/runs/{r.run_id()}"
