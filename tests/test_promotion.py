"""Promotion by evaluation (cloob/registry/promotion.py): the champion alias moves only when a
challenger wins on the rule; the paired bootstrap over per-image outcomes; the decision kept in the
alias's history; the cycle through the `cloob` commands, with real evaluations."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from cloob import cli
from cloob.data import synthetic
from cloob.registry import Registry
from cloob.registry import promotion as P
from cloob.results import outcomes
from cloob.results.table import append_rows, read_rows

T0 = datetime(2026, 12, 7, tzinfo=UTC)


def _checkpoint(run_dir: Path, seed: int) -> str:
    import torch

    from cloob.train.checkpoint import CheckpointStore

    g = torch.Generator().manual_seed(seed)
    return CheckpointStore(str(run_dir)).save(10, {"w": torch.randn(4, generator=g)}, {"model_cfg": {}}, {"step": 10},
                                              {"arch": "cloob-tiny-vit", "method": "cloob", "run_name": run_dir.name},
                                              keep=1).url


def _evaluated(results: str, entry: dict, dataset: str, correct, labels=None, *, keep: bool = True,
               settings: str = "s1", data: str = "d1", metric: str = "top1", at: int = 0) -> dict:
    """A results row of `entry` on `dataset` whose main metric comes from `correct` (per image), with
    its outcomes file unless keep=False (a row of an older version)."""
    correct = np.asarray(correct, bool)
    labels = np.zeros(len(correct), np.int32) if labels is None else np.asarray(labels, np.int32)
    row = {"run_id": entry["run_id"], "checkpoint_id": entry["id"], "dataset": dataset, "task": "zeroshot",
           "main_metric": metric, "main_value": outcomes.metric(metric, correct, labels), "n_images": len(correct),
           "eval_settings_hash": settings, "dataset_hash": data, "finished_at": T0 + timedelta(seconds=at),
           "row_uuid": uuid.uuid4().hex}
    if keep:
        outcomes.write(results, row, outcomes.image_ids([f"img{i}" for i in range(len(correct))]), labels, correct)
    append_rows(results, [row])
    return row


@pytest.fixture
def two(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    a = reg.register(_checkpoint(tmp_path / "runs" / "old", 1))
    b = reg.register(_checkpoint(tmp_path / "runs" / "new", 2))
    return reg, str(tmp_path / "results"), a, b


def test_bootstrap_matches_a_direct_resampling_loop():
    rng = np.random.default_rng(5)
    n = 60
    labels = rng.integers(0, 4, n)
    a, b = rng.random(n) < 0.7, rng.random(n) < 0.5
    for metric in ("top1", "mean_per_class_recall"):
        lo, hi = P.paired_bootstrap([(metric, labels, a, b)], replicates=400, seed=3, confidence=0.9)
        # The same draws, one replicate at a time, with the metric computed as the evaluation does.
        draw = np.random.default_rng(3).integers(0, n, size=(400, n))
        diffs = [outcomes.metric(metric, a[i], labels[i]) - outcomes.metric(metric, b[i], labels[i]) for i in draw]
        assert (lo, hi) == pytest.approx((np.quantile(diffs, 0.05), np.quantile(diffs, 0.95)))
        assert lo < outcomes.metric(metric, a, labels) - outcomes.metric(metric, b, labels) < hi


def test_first_model_becomes_champion_a_winner_moves_it_a_loser_gets_challenger(two):
    reg, results, a, b = two
    rng = np.random.default_rng(0)
    good, bad = rng.random(400) < 0.8, rng.random(400) < 0.4
    _evaluated(results, a, "shapes", bad)
    _evaluated(results, a, "colors", bad)
    first = P.promote(reg, results, [a["id"]])
    assert first[0]["promoted"] and first[0]["reason"] == "no champion yet"
    assert reg.aliases()["champion"] == a["id"]
    _evaluated(results, b, "shapes", good)
    _evaluated(results, b, "colors", good)
    d = P.promote(reg, results, [b["id"]], {"promote_on": ["shapes", "colors"], "min_gain": 0.05,
                                            "require_significant": True})[0]
    assert d["promoted"] and reg.aliases()["champion"] == b["id"]
    assert [s["dataset"] for s in d["sets"]] == ["shapes", "colors"]
    assert d["gain"] == pytest.approx(good.mean() - bad.mean())
    assert d["interval"][0] > 0.05 and d["interval"][0] < d["gain"] < d["interval"][1]
    # The history of champion keeps both moves, the second with the rule, the numbers and the interval.
    moves = reg.alias_history("champion")
    assert [m["entry"] for m in moves] == [a["id"], b["id"]]
    assert moves[1]["decision"]["rule"]["min_gain"] == 0.05
    assert moves[1]["decision"]["sets"][0]["champion"] == pytest.approx(bad.mean())
    # The old champion is not decided again against the new one (a model is a challenger once),
    # and decided directly it loses.
    assert P.promote(reg, results, [a["id"]])[0]["recorded"] is False
    [again] = P.promote(reg, results, [a["id"]], again=True)
    assert not again["promoted"] and again["gain"] == pytest.approx(bad.mean() - good.mean())
    assert (reg.aliases()["champion"], reg.aliases()["challenger"]) == (b["id"], a["id"])
    # Asked once more, nothing is decided again and nothing moves.
    n_moves = len(reg.alias_history("challenger")) + len(reg.alias_history("champion"))
    assert P.promote(reg, results, [a["id"], b["id"]]) and \
        len(reg.alias_history("challenger")) + len(reg.alias_history("champion")) == n_moves


def test_a_gain_within_noise_is_not_promoted_when_significance_is_required(two):
    reg, results, a, b = two
    rng = np.random.default_rng(1)
    base = rng.random(200) < 0.5
    better = base.copy()
    better[np.flatnonzero(~base)[:3]] = True  # 3 images more out of 200: +1.5 points
    _evaluated(results, a, "shapes", base)
    _evaluated(results, b, "shapes", better)
    reg.set_alias("champion", a["id"])
    plain = P.decide(reg, results, b["id"], {"promote_on": "shapes"})
    assert plain["promoted"] and plain["interval"][0] <= 0 < plain["interval"][1]
    strict = P.decide(reg, results, b["id"], {"promote_on": "shapes", "require_significant": True})
    assert not strict["promoted"] and "noise" in strict["reason"]
    assert "interval [" in P.report(strict)


def test_rows_without_outcomes_or_other_images_compare_on_means_and_say_so(two):
    reg, results, a, b = two
    reg.set_alias("champion", a["id"])
    _evaluated(results, a, "shapes", [True] * 5 + [False] * 5, keep=False)  # an older version's row
    _evaluated(results, b, "shapes", [True] * 8 + [False] * 2)
    d = P.decide(reg, results, b["id"])
    assert d["promoted"] and d["interval"] is None and "no per-image outcomes" in d["interval_note"]
    strict = P.decide(reg, results, b["id"], {"require_significant": True})
    assert not strict["promoted"] and strict["reason"] == "significance required, but no interval was possible"
    # Different settings on the champion's side: not compared at all, with the fix.
    _evaluated(results, b, "colors", [True] * 10, settings="s2")
    _evaluated(results, a, "colors", [True] * 10, settings="s1")
    with pytest.raises(P.PromotionError, match="colors: the champion has no row with the challenger's eval settings"):
        P.decide(reg, results, b["id"], {"promote_on": ["shapes", "colors"]})


def test_images_are_paired_by_identity_not_position(two):
    reg, results, a, b = two
    reg.set_alias("champion", a["id"])
    ra = _evaluated(results, a, "shapes", [True, False, True, False] * 10)
    rb = _evaluated(results, b, "shapes", [True, True, True, False] * 10)
    # The same images in another order (workers interleave): the pairing follows the ids.
    o = outcomes.read(results, rb["row_uuid"])
    perm = np.random.default_rng(0).permutation(len(o))
    outcomes.write(results, rb, o.ids[perm], o.labels[perm], o.correct[perm])
    assert P.decide(reg, results, b["id"])["interval"] is not None
    # Other images: refused for the interval, said so.
    outcomes.write(results, rb, outcomes.image_ids([f"other{i}" for i in range(40)]), o.labels, o.correct)
    d = P.decide(reg, results, b["id"])
    assert d["interval"] is None and d["interval_note"] == "no interval: shapes: the models scored different images"
    assert ra["row_uuid"] != rb["row_uuid"]


def test_the_cycle_through_the_cloob_commands(tmp_path, make_random_checkpoint, capsys):
    """Without Prefect: register, evaluate (outcomes kept beside each row), promote, history. A model
    made worse on purpose (its image tower zeroed: one answer for every image) is not promoted."""
    store = tmp_path / "store"
    data = tmp_path / "shapes"
    synthetic.write_class_folders(data, per_class=4, image_size=32, seed=4)
    good = make_random_checkpoint(tmp_path / "runs" / "good", seed=11, run_name="good").url
    worse = _worse_checkpoint(tmp_path / "runs" / "worse")
    ev = ["--data", f"shapes={data}", "--store", str(store), "--batch-size", "16", "--workers", "0"]
    assert cli.main(["registry", "register", good, "--store", str(store)]) == 0
    assert cli.main(["evaluate", good, *ev]) == 0
    row = read_rows(str(store / "results")).to_pylist()[0]
    kept = outcomes.read(str(store / "results"), row["row_uuid"])
    assert len(kept) == row["n_images"] == 72 and kept.correct.mean() == pytest.approx(row["top1"])
    assert cli.main(["registry", "promote", "--store", str(store)]) == 0
    assert "promoted to champion: no champion yet" in capsys.readouterr().out
    # A second promote of the same model: nothing moves.
    assert cli.main(["registry", "promote", "latest", "--store", str(store)]) == 0
    assert "nothing moved (already the champion)" in capsys.readouterr().out
    assert cli.main(["registry", "register", worse, "--store", str(store)]) == 0
    assert cli.main(["evaluate", worse, *ev]) == 0
    capsys.readouterr()
    assert cli.main(["registry", "promote", "latest", "--on", "shapes", "--require-significant",
                     "--store", str(store)]) == 0
    out = capsys.readouterr().out
    reg = Registry(str(store / "registry"))
    assert reg.aliases()["champion"] == reg.resolve(good)["id"] and reg.aliases()["challenger"] == reg.resolve("latest")["id"]
    assert "not promoted (challenger)" in out and "95% interval [" in out
    assert cli.main(["registry", "history", "challenger", "--store", str(store)]) == 0
    hist = capsys.readouterr().out
    assert "worse step 2" in hist and "shapes" in hist and "interval [" in hist
    assert cli.main(["registry", "history", "champion", "--store", str(store)]) == 0
    assert "no champion yet" in capsys.readouterr().out
    moves = json.loads(json.dumps(reg.alias_history("challenger")))
    assert moves[0]["decision"]["sets"][0]["n_images"] == 72
    assert cli.main(["registry", "show", "challenger", "--store", str(store)]) == 0  # show names its decisions
    assert [p["alias"] for p in json.loads(capsys.readouterr().out)["promotion"]] == ["challenger"]


def _worse_checkpoint(folder: Path) -> str:
    """A model made worse on purpose: the image tower's weights zeroed, so every image gets the same
    embedding and the same answer (one class in 18), saved as training saves a checkpoint."""
    import torch

    from cloob.model import create_model, model_config
    from cloob.train.checkpoint import CheckpointStore

    arch = "cloob-tiny-vit"
    torch.manual_seed(11)
    model, *_ = create_model(arch)
    state = {k: (v.zero_() if k.startswith("visual.") and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    return CheckpointStore(str(folder)).save(2, state, {"model_cfg": model_config(arch)}, {},
                                             {"arch": arch, "method": "cloob", "run_name": "worse"}, keep=1).url


def test_two_promotions_at_once_do_not_move_the_champion_on_a_stale_comparison(tmp_path, monkeypatch):
    """Two retrains on one store promote at the same moment: both challengers beat the old champion,
    A (60%) and B (80%). Each decided against the old one; B records first. A's decision is stale (the
    champion moved meanwhile): it is decided again against B and loses, so the champion is B, the
    best, not whichever wrote last."""
    import threading

    reg = Registry(str(tmp_path / "registry"))
    results = str(tmp_path / "results")
    old, a, b = (reg.register(_checkpoint(tmp_path / "runs" / n, s)) for n, s in (("old", 1), ("a", 2), ("b", 3)))
    rng = np.random.default_rng(0)
    for entry, p in ((old, 0.4), (a, 0.6), (b, 0.8)):
        _evaluated(results, entry, "shapes", rng.random(400) < p)
    reg.set_alias("champion", old["id"])
    decided, b_recorded = threading.Barrier(2), threading.Event()
    real_decide = P.decide

    def decide(registry, results_uri, challenger, rule=None, **kw):
        d = real_decide(registry, results_uri, challenger, rule, **kw)
        if threading.current_thread().name in ("A", "B") and not getattr(threading.current_thread(), "again", False):
            threading.current_thread().again = True
            decided.wait(timeout=30)  # both decided against the old champion before either records
            if threading.current_thread().name == "A":
                b_recorded.wait(timeout=30)
        return d

    monkeypatch.setattr(P, "decide", decide)
    out = {}

    def run(name, entry):
        out[name] = P.promote(Registry(str(tmp_path / "registry")), results, [entry["id"]])
        if name == "B":
            b_recorded.set()

    threads = [threading.Thread(target=run, args=(n, e), name=n) for n, e in (("A", a), ("B", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert reg.aliases()["champion"] == b["id"]
    [last_a] = [m for m in reg.alias_history("challenger") if m["entry"] == a["id"]]
    assert last_a["decision"]["champion"]["id"] == b["id"]  # A was compared with B, the champion when it recorded
    assert [m["entry"] for m in reg.alias_history("champion")] == [old["id"], b["id"]]


def test_a_promotion_killed_between_its_decision_and_its_alias_write_is_decided_again(two, monkeypatch):
    reg, results, old, new = two
    rng = np.random.default_rng(1)
    _evaluated(results, old, "shapes", rng.random(300) < 0.4)
    _evaluated(results, new, "shapes", rng.random(300) < 0.8)
    reg.set_alias("champion", old["id"])

    def killed(*a, **k):
        raise KeyboardInterrupt  # what a kill does to the process between the two steps

    monkeypatch.setattr(reg, "set_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        P.promote(reg, results, [new["id"]])
    monkeypatch.undo()
    assert reg.aliases()["champion"] == old["id"] and P.decided_before(reg, new["id"]) is None  # nothing half-written
    [d] = P.promote(reg, results, [new["id"]])
    assert d["promoted"] and d["recorded"] and reg.aliases()["champion"] == new["id"]
