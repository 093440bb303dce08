"""Names that become paths (study, data spec, run, downstream set, registry alias) are plain names:
each is refused where it is read or given, with one message naming the field, the value and the fix,
before anything runs or is written (fault report 2026-12-07, B2: `name: ../../evil`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cloob.errors import CloobError
from cloob.names import FIX, check_name

BAD = ["..", "a/b", "/tmp/abs", "s3://other-bucket/x"]
REPO = Path(__file__).resolve().parents[1]


def _refused(call, field: str, bad: str) -> CloobError:
    with pytest.raises(CloobError) as e:
        call()
    assert field in e.value.problem and repr(bad) in e.value.problem and "plain name" in e.value.problem, e.value
    assert e.value.fix == FIX
    return e.value


@pytest.mark.parametrize("bad", BAD)
def test_the_shared_check(bad):
    _refused(lambda: check_name(bad, "thing name"), "thing name", bad)


def test_plain_names_pass():
    for good in ("demo", "cloob_vs_clip_cc3m", "tiny-cloob-steps40-8d87177f34", "best-flowers102", "v1.2"):
        assert check_name(good, "x") == good


@pytest.mark.parametrize("bad", BAD)
def test_a_study_name(bad):
    from cloob.study.spec import load_study

    _refused(lambda: load_study("demo", [f"name={bad}"]), "study name", bad)
    data = yaml.safe_load((REPO / "cloob/studies/demo.yaml").read_text())
    _refused(lambda: load_study({**data, "name": bad}), "study name", bad)


@pytest.mark.parametrize("bad", BAD)
def test_a_data_spec_name(bad):
    from cloob.prepare.spec import load_spec

    _refused(lambda: load_spec("demo", [f"name={bad}"]), "dataset spec name", bad)


@pytest.mark.parametrize("bad", BAD)
def test_a_run_name(bad, tmp_path):
    from cloob.config import load_recipe

    _refused(lambda: load_recipe("tiny", [f"train.run_name={bad}"]), "train.run_name", bad)
    recipe = yaml.safe_load((REPO / "cloob/recipes/tiny.yaml").read_text())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "name": bad}))  # the default run name starts with it
    _refused(lambda: load_recipe(str(path), []), "recipe name", bad)


@pytest.mark.parametrize("bad", BAD)
def test_a_downstream_set_name(bad, tmp_path):
    from cloob.evaluate.sets.spec import load_downstream_spec
    from cloob.evaluate.targets import prepared_sets

    spec = yaml.safe_load((REPO / "data_specs/downstream/colors.yaml").read_text())
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": bad}))
    _refused(lambda: load_downstream_spec(str(path)), "downstream set name", bad)
    _refused(lambda: prepared_sets(str(tmp_path / "downstream"), [bad]), "downstream set name", bad)


@pytest.mark.parametrize("bad", BAD)
def test_a_registry_alias(bad, tmp_path, capsys):
    from cloob import cli
    from cloob.registry import Registry

    _refused(lambda: Registry(str(tmp_path / "reg")).set_alias(bad, "0" * 64), "alias", bad)
    assert cli.main(["registry", "alias", bad, "latest", "--registry", str(tmp_path / "reg")]) == 2
    err = capsys.readouterr().err
    assert f"alias {bad!r} is not a plain name" in err and "fix: use a plain name" in err
    assert not (tmp_path / "reg" / "aliases").exists()


def test_the_study_command_refuses_a_bad_name_before_anything_runs(tmp_path, capsys):
    from flows.cli import main

    data = yaml.safe_load((REPO / "cloob/studies/demo.yaml").read_text())
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump({**data, "name": "../../evil"}))
    store = tmp_path / "deep" / "store"
    assert main(["study", str(study), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "study name '../../evil' is not a plain name" in err and "fix:" in err
    assert not store.exists() and not (tmp_path / "evil").exists()


def test_table_names_are_cut_in_the_middle_and_recipes_listed_whole(capsys):
    """A run's name in a table keeps its head (recipe, method) and its tail (hash, step); `cloob recipes`
    prints each recipe's whole opening sentence(s), not its first line (new-user report 2026-12-07)."""
    from cloob.cli import main
    from cloob.names import shorten

    name = "tiny-cloob-steps100-20ff5b6189@100"
    assert shorten(name, 40) == name
    cut = shorten("tiny-cloob-steps300-inv_tau30-beta25-mydata-v12-d3c06d2dca@300", 30)
    assert len(cut) == 30 and cut.startswith("tiny-cloob-st") and cut.endswith("d3c06d2dca@300") and "…" in cut
    assert main(["recipes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "AMP, inv_tau = 30 fixed, Hopfield beta = 8." in out
    assert "inv_tau = 30 fixed as in the paper's comparison." in out and "torchrun" not in out
