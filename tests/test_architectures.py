"""The architecture names the launcher checks without open_clip are the names open_clip knows."""

import pytest

from cloob.architectures import check_architecture, known_architectures
from cloob.errors import CloobError


def test_the_light_list_is_open_clips_list():
    import open_clip

    import cloob.model  # registers cloob/model_configs with open_clip

    assert list(known_architectures()) == sorted(open_clip.list_models())
    assert {"cloob-tiny-vit", "cloob-tiny-rn", "RN50", "ViT-B-16"} <= set(known_architectures())
    assert cloob.model.check_architecture is check_architecture


def test_an_unknown_name_is_refused_with_the_closest_names():
    check_architecture("RN50")
    with pytest.raises(CloobError) as e:
        check_architecture("RN5O")
    assert "unknown architecture 'RN5O'" in str(e.value) and "RN50" in e.value.fix
