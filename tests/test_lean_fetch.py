"""cloob.prepare.download.lean: img2dataset's processes start without torch, ray, wandb and
albumentations, and a download in them still resizes, encodes and writes as before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import child_env

HEAVY = ("torch", "ray", "wandb", "albumentations")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_img2dataset_imports_without_the_heavy_modules_and_resizes_on_first_use():
    got = _run(f"""
        import io, json, sys, types
        from cloob.prepare.download.lean import make_lean
        make_lean()
        import img2dataset  # the writer (webdataset), the logger (wandb), the distributor (ray), the resizer
        loaded = lambda: [m for m in {HEAVY!r} if type(sys.modules.get(m)) is types.ModuleType]
        at_import = loaded()
        from img2dataset.resizer import Resizer, ResizeMode
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (96, 48), (200, 30, 30)).save(buf, format="JPEG")
        buf.seek(0)
        img, w, h, w0, h0, err = Resizer(image_size=32, resize_mode=ResizeMode.keep_ratio, resize_only_if_bigger=False)(buf)
        print(json.dumps({{"at_import": at_import, "after_resize": loaded(), "size": [w, h, w0, h0], "err": err,
                          "decoded": Image.open(io.BytesIO(img)).size}}))
    """)
    assert got["at_import"] == [], got  # not one of them imported with img2dataset
    assert got["err"] is None and got["size"] == [64, 32, 96, 48] and got["decoded"] == [64, 32], got
    assert got["after_resize"] == ["albumentations"], got  # the real one, on its first use


def test_a_deferred_module_is_the_real_one_from_its_first_use_and_a_missing_one_stays_missing():
    got = _run("""
        import json, sys
        from cloob.prepare.download.lean import defer
        defer("colorsys"); defer("no_such_module_here")
        import colorsys as early  # the stand-in: nothing imported yet
        stand_in = "hls_to_rgb" not in vars(early)
        value = early.rgb_to_hsv(1.0, 0.0, 0.0)  # first use: the real module
        import colorsys as late
        print(json.dumps({"stand_in": stand_in, "value": list(value), "real_now": late.__name__ == "colorsys"
                          and "hls_to_rgb" in vars(late), "missing": "no_such_module_here" in sys.modules}))
    """)
    assert got == {"stand_in": True, "value": [0.0, 1.0, 1.0], "real_now": True, "missing": False}, got
