"""The architecture names the launcher checks without open_clip are the names open_clip knows, and a
training rank leaves timm out only for towers that do not use it."""

import subprocess
import sys
from pathlib import Path

import pytest

from cloob.architectures import check_architecture, known_architectures, uses_timm
from cloob.errors import CloobError


def test_the_light_list_is_open_clips_list():
    import open_clip

    import cloob.model  # registers cloob/model_configs with open_clip

    assert list(known_architectures()) == open_clip.list_models()  # the same names, in the same order
    assert {"cloob-tiny-vit", "cloob-tiny-rn", "RN50", "ViT-B-16"} <= set(known_architectures())
    assert cloob.model.check_architecture is check_architecture


def test_an_unknown_name_is_refused_with_the_closest_names():
    check_architecture("RN50")
    with pytest.raises(CloobError) as e:
        check_architecture("RN5O")
    assert "unknown architecture 'RN5O'" in str(e.value) and "RN50" in e.value.fix


def test_uses_timm_agrees_with_open_clips_configs():
    import open_clip

    import cloob.model  # noqa: F401 (registers cloob/model_configs with open_clip)

    timm_towers = {a for a in open_clip.list_models() if open_clip.get_model_config(a)["vision_cfg"].get("timm_model_name")}
    assert timm_towers and "convnext_base" in timm_towers  # the check below has both kinds to tell apart
    assert {a for a in known_architectures() if uses_timm(a)} == timm_towers
    assert uses_timm("no-such-arch")  # unknown: never left out


_RANK_START = """
import sys
from cloob.architectures import skip_timm_for_args
skip_timm_for_args(sys.argv[1:])
import cloob.model
print(sys.modules.get("timm") is not None)
if sys.argv[-1] == "model.arch=cloob-tiny-vit":  # builds without timm
    print(type(cloob.model.create_model("cloob-tiny-vit")[0].visual).__name__)
"""


@pytest.mark.parametrize(("arch", "out"), [("cloob-tiny-vit", ["False", "VisionTransformer"]), ("convnext_base", ["True"])])
def test_a_rank_imports_timm_only_for_a_timm_tower(arch, out):
    """What `python -m cloob.train` does before importing the loop, in a fresh interpreter: the tiny
    ViT builds without timm ever loaded; a timm tower gets timm."""
    proc = subprocess.run([sys.executable, "-c", _RANK_START, "tiny", f"model.arch={arch}"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == out
