"""The study's parts without training: the spec, its cells, the statistics over seeds (against scipy),
and the summary of a results table (against a direct computation on the same rows)."""

import math
import random
import statistics

import pytest
import yaml

from cloob.errors import CloobError
from cloob.study.cells import KEEP_ALL, cells, checkpoint_every, group_label, method_settings, steps_to_evaluate
from cloob.study.spec import load_study
from cloob.study.stats import summarize, two_sided_p, welch
from cloob.study.summary import relative_eigenvalue_change, summarize_study

BASE = {"name": "t", "data": "demo", "recipe": "tiny", "downstream": ["shapes"]}


def test_a_study_expands_into_one_ordinary_run_per_cell():
    spec = load_study({**BASE, "methods": ["cloob", "clip"], "seeds": 2, "sweep": {"loss.beta": [8, 14.3]},
                       "method_overrides": {"cloob": ["model.inv_tau=50"]}, "evaluate": {"every": 100, "steps": [50]}})
    cs = cells(spec)
    assert len(cs) == 2 * 2 * 2 and len({c.group for c in cs}) == 4
    assert checkpoint_every(spec) == 50
    first = cs[0]
    assert (first.method, first.seed, first.point) == ("cloob", 0, (("loss.beta", 8),))
    assert list(first.overrides) == ["model.inv_tau=50", "loss.method=cloob", "loss.beta=8", "train.seed=0",
                                     "train.checkpoint_every=50", f"train.keep_checkpoints={KEEP_ALL}"]
    assert all("model.inv_tau=50" not in c.overrides for c in cs if c.method == "clip")
    assert method_settings(cs) == {"cloob": ["model.inv_tau=50"]}  # what the report says under its title
    from cloob.config import load_recipe

    ids = {load_recipe("tiny", ["data.train=./d", *c.overrides]).run_id() for c in cs}
    assert len(ids) == len(cs) and all(i.startswith(("tiny-cloob-", "tiny-clip-")) for i in ids)
    assert steps_to_evaluate(spec, [50, 100, 150, 200, 230]) == [50, 100, 200, 230]
    assert steps_to_evaluate(load_study(BASE), [100, 200, 300]) == [300]  # no steps asked: the last only


@pytest.mark.parametrize(("change", "said"), [
    ({"methods": ["cloob", "clop"]}, "unknown method(s) ['clop']"),
    ({"seeds": 0}, "seeds must be at least 1"),
    ({"sweep": {"train.seed": [1, 2]}}, "use methods, seeds or archs"),
    ({"method_overrides": {"infoloob": ["loss.beta=8"]}}, "not among the methods"),
    ({"seedz": 3}, "seedz: unknown field"),
    ({"downstream": []}, "downstream"),
    ({"method_sweep": {"infoloob": {"loss.beta": [8]}}}, "method_sweep names ['infoloob']"),
    ({"method_sweep": {"clip": {"model.inv_tau": []}}}, "method_sweep.clip 'model.inv_tau': give section.field"),
    ({"sweep": {"loss.beta": [8]}, "method_sweep": {"cloob": {"loss.beta": [14.3]}}}, "sweep already sweeps"),
])
def test_a_bad_study_is_one_clear_error(change, said):
    with pytest.raises(CloobError, match="invalid study") as e:
        load_study({**BASE, **change})
    assert said in str(e.value) and "fix:" in str(e.value)


def test_each_method_can_have_its_own_sweep_and_the_report_ranks_its_settings():
    """A tuning study: CLIP tries two inv_tau, CLOOB two (inv_tau, beta) points; the same budget each."""
    from cloob.study.report import render_markdown, study_data
    from cloob.study.summary import rank_settings

    spec = load_study({**BASE, "downstream": ["shapes", "colors"], "seeds": 2,
                       "method_sweep": {"clip": {"model.inv_tau": [10, 20]},
                                        "cloob": {"model.inv_tau": [30], "loss.beta": [8, 14.3]}}})
    cs = cells(spec)
    assert sorted({c.label for c in cs}) == ["clip inv_tau=10", "clip inv_tau=20", "cloob inv_tau=30 beta=14.3",
                                            "cloob inv_tau=30 beta=8"]
    assert len(cs) == 8 and all(("model.inv_tau=10" in c.overrides) == (c.label == "clip inv_tau=10") for c in cs)
    rng = random.Random(1)
    by_run = {f"run{i}": c for i, c in enumerate(cs)}
    rows = [{"run_id": run, "step": 300, "dataset": ds, "main_value": rng.random()}
            for run in by_run for ds in spec.downstream]
    s = summarize_study(by_run, rows)
    ranking = rank_settings(s)
    for method in ("clip", "cloob"):
        direct = {}
        for g in {c.group for c in cs if c.method == method}:
            runs = [r for r, c in by_run.items() if c.group == g]
            per_seed = {by_run[r].seed: statistics.mean(x["main_value"] for x in rows if x["run_id"] == r) for r in runs}
            direct[g] = (statistics.mean(per_seed.values()), min(per_seed.items(), key=lambda kv: kv[1]))
        assert [r["group"] for r in ranking[method]] == sorted(direct, key=lambda g: -direct[g][0])
        for r in ranking[method]:
            assert r["score"] == pytest.approx(direct[r["group"]][0])
            assert r["worst_seed"][0] == direct[r["group"]][1][0]
            assert r["worst_seed"][1] == pytest.approx(direct[r["group"]][1][1])
    assert method_settings(cs) == {"cloob": ["model.inv_tau=30"]}  # its one swept inv_tau; beta varies
    md = render_markdown("t", s, {}, 2, {"cloob": ["model.inv_tau=50", "loss.beta=25"], "clip": ["model.inv_tau=10"]})
    assert "Each method's own settings: clip: model.inv_tau=10; cloob: model.inv_tau=50 loss.beta=25." in md
    best = ranking["cloob"][0]["group"]
    assert "## Settings, best first" in md and f"**{group_label(best).removeprefix('cloob ')}**" in md
    assert "CLOOB and CLIP share no setting" in md
    assert study_data(s)["ranking"]["clip"][0]["score"] == pytest.approx(ranking["clip"][0]["score"])


@pytest.mark.parametrize(("sweep", "said"), [
    ({"sweep": {"loss.betaa": [8]}}, "loss.betaa: unknown field"),
    ({"method_sweep": {"cloob": {"model.inv_tau": [30, 500]}}}, "model.inv_tau: Input should be less than or equal to 100"),
])
def test_a_cell_whose_recipe_is_invalid_is_refused_before_anything_runs(sweep, said, tmp_path, capsys):
    from cloob.study.cells import check_cells
    from flows.cli import main

    with pytest.raises(CloobError) as e:
        check_cells(load_study({**BASE, **sweep}))
    assert said in str(e.value) and "study t, cell cloob" in str(e.value) and "fix:" in str(e.value)
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump({**BASE, **sweep}))
    assert main(["study", str(study), "--store", str(tmp_path / "store")]) == 2  # the command, before Prefect
    err = capsys.readouterr().err
    assert said in err and not (tmp_path / "store" / "prefect").exists()


def test_welch_matches_scipy_and_says_when_there_is_no_test():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(20):
        a = [rng.gauss(0.3, 0.05) for _ in range(rng.randint(2, 7))]
        b = [rng.gauss(0.32, rng.choice([0.01, 0.08])) for _ in range(rng.randint(2, 7))]
        ours, ref = welch(a, b), stats.ttest_ind(a, b, equal_var=False)
        assert ours.t == pytest.approx(ref.statistic, rel=1e-12) and ours.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert ours.significant == (ref.pvalue < 0.05)
    for t, df in ((0.1, 1.5), (2.5, 4.0), (12.0, 30.0), (-3.0, 100.0)):
        assert two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert welch([0.3], [0.2, 0.25]).reason.startswith("too few seeds for a test (1 and 2")
    assert welch([0.3, 0.3], [0.2, 0.2]).p is None
    s = summarize([0.1, 0.2, 0.4])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(statistics.mean([0.1, 0.2, 0.4])),
                                    pytest.approx(statistics.stdev([0.1, 0.2, 0.4])))


def _rows(spec, steps=(1, 2)):
    """A results table of the study's cells: main_value and diagnostics made up per run and step."""
    rng = random.Random(0)
    by_run, rows = {}, []
    for c in cells(spec):
        run = f"run-{c.method}-{c.seed}"
        by_run[run] = c
        for step in steps:
            for ds in spec.downstream:
                rows.append({"run_id": run, "step": step, "dataset": ds, "main_value": rng.random(),
                             "image_effective_eigenvalues": rng.randint(5, 50), "text_effective_eigenvalues": 9,
                             "image_ajne": rng.random(), "text_ajne": 0.25})
    return by_run, rows


def test_the_summary_equals_a_direct_computation_on_the_table():
    spec = load_study({**BASE, "downstream": ["shapes", "colors"], "seeds": 2})
    by_run, rows = _rows(spec)
    rows.append({"run_id": "someone-else", "step": 2, "dataset": "shapes", "main_value": 1.0})  # not the study's
    s = summarize_study(by_run, rows)
    for ds in ("shapes", "colors"):
        for method in ("cloob", "clip"):
            values = [r["main_value"] for r in rows if r["dataset"] == ds and r["step"] == 2
                      and r["run_id"].startswith(f"run-{method}-")]
            got = s.final[(ds, (method, None, ()))]
            assert (got.n, got.mean, got.std) == (2, pytest.approx(statistics.mean(values)),
                                                  pytest.approx(statistics.stdev(values)))
            curve = s.curves[(ds, (method, None, ()))]
            assert [step for step, _ in curve] == [1, 2] and curve[-1][1].mean == pytest.approx(statistics.mean(values))
        cmp = s.comparisons[(ds, (None, ()))]
        cl = [r["main_value"] for r in rows if r["dataset"] == ds and r["step"] == 2 and "cloob" in r["run_id"]]
        cp = [r["main_value"] for r in rows if r["dataset"] == ds and r["step"] == 2 and "clip" in r["run_id"]]
        assert cmp.t == pytest.approx(welch(cl, cp).t)
    # One diagnostics point per (run, step, set), and the eigenvalues' change against the first step.
    assert len(s.diagnostics) == len(by_run) * 2 * 2
    assert len({(d["run_id"], d["step"], d["dataset"]) for d in s.diagnostics}) == len(s.diagnostics)
    change = relative_eigenvalue_change(s.diagnostics)
    d1 = {(r["run_id"], r["dataset"], r["step"]): r["image_effective_eigenvalues"] for r in rows if "image_ajne" in r}
    for c in change:
        expect = d1[(c["run_id"], c["dataset"], c["step"])] / d1[(c["run_id"], c["dataset"], 1)] - 1
        assert c["reference_step"] == 1 and math.isclose(c["relative_change"], expect)
    assert not s.missing
    assert summarize_study({**by_run, "never-trained": cells(spec)[0]}, rows).missing == ["never-trained"]


def test_a_binary_file_given_as_the_study_is_one_error_naming_it(tmp_path, capsys):
    """Fault report B24: 3 KB of random bytes as the study YAML was a 24-line UnicodeDecodeError."""
    from flows.cli import main

    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(random.Random(5).randrange(256) for _ in range(3000)))
    assert main(["study", str(junk), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: study {junk} is not a text file") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 2 and "\n  fix: give a YAML study" in err
    assert not (tmp_path / "store").exists()
