"""cloob/methods.py is the one list of methods: an entry added there (and nowhere else) is a method
for the recipe's validation, the loss, the study spec and the results' order and colours."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloob import methods
from cloob.errors import CloobError
from cloob.methods import Method

NEW = Method("nce_wide", "infonce", "none", "NCE-WIDE", "Reds")


@pytest.fixture
def new_method(monkeypatch):
    # methods.METHODS is the dict every reader imports: adding to it is adding to the one list
    monkeypatch.setitem(methods.METHODS, NEW.name, NEW)
    return NEW


def test_an_unknown_method_is_refused_naming_the_list():
    from cloob.config import load_recipe

    with pytest.raises(CloobError, match=r"loss\.method: .*choose one of clip, cloob, infoloob, clip_hopfield"):
        load_recipe("tiny", [f"loss.method={NEW.name}"])


def test_a_new_entry_is_a_method_for_the_recipe_the_loss_and_the_study(new_method):
    from cloob.config import load_recipe
    from cloob.losses import LossSpec
    from cloob.study.spec import StudySpec

    recipe = load_recipe("tiny", [f"loss.method={NEW.name}"])
    assert (recipe.loss.objective, recipe.loss.retrieval) == ("infonce", "none")
    spec = LossSpec.from_method(NEW.name)
    assert (spec.objective, spec.retrieval) == ("infonce", "none")
    assert StudySpec.model_validate({"name": "s", "data": "demo", "recipe": "tiny", "methods": ["clip", NEW.name],
                                     "downstream": ["shapes"]}).methods == ["clip", NEW.name]
    assert methods.order(NEW.name) == 4 and methods.order("nothing") == 5


def test_a_new_entry_orders_and_colours_the_results(new_method, tmp_path):
    import matplotlib

    from cloob.results.arrange import build_report
    from cloob.results.figure import method_colors
    from cloob.results.table import append_rows
    from tests.test_results import _row

    uri = str(tmp_path / "results")
    # config-hash run names: the method, not the hash, orders the columns, the new method after cloob's
    for run, method in (("tiny-0a293b34db", NEW.name), ("tiny-fc6678aa8e", "cloob"), ("tiny-1234abcd99", "clip")):
        append_rows(uri, [_row(run=run, ckpt=f"k-{method}", dataset="shapes", method=method, step=500,
                               arch="cloob-tiny-vit", pretraining_data="demo")])
    rep = build_report(uri, paper=None)
    assert [c.method for c in rep.checkpoints] == ["clip", "cloob", NEW.name]
    assert method_colors([NEW.name]) == [matplotlib.colormaps["Reds"](0.65)]
    assert method_colors(["unlisted"]) == [matplotlib.colormaps["Greys"](0.65)]


def test_no_other_module_lists_the_methods():
    """A method name that is no other word (clip, cloob and infoloob are also a model, the package and an
    objective) is quoted in methods.py only (the YAML studies may name methods: that is data)."""
    root = Path(methods.__file__).parent
    hits = [f"{p.relative_to(root)}" for p in root.rglob("*.py") if '"clip_hopfield"' in p.read_text()]
    assert hits == ["methods.py"]
