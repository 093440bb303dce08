"""The built wheel is complete: installed from it alone (no source tree), `cloob prepare demo` runs and
the shipped data specs, recipes and model configs are found inside the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import child_env

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` sets UV to its own binary
    if not uv:
        pytest.skip("building the wheel needs uv (python3 -m pip install uv)")
    cmd = [uv, "build", "--wheel", "--out-dir", str(out), str(REPO)]
    # Offline first: hatchling is in uv's cache once `uv sync` has built the project; else the index.
    proc = subprocess.run([*cmd, "--offline"], capture_output=True, text=True)
    if proc.returncode != 0:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    [wheel] = out.glob("cloob-*.whl")
    return wheel


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp / "dist")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def _python(site: Path, cwd: Path, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # child_env's path first on sys.path: cloob and flows come from the unpacked wheel, not the checkout
    # (the checkout's editable install is only on the path after site-packages).
    env = child_env(path=site)
    return subprocess.run([sys.executable, "-c", code, str(site), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_holds_the_specs_recipes_and_model_configs(unpacked):
    files = {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()}
    for src in [*REPO.glob("data_specs/**/*.yaml"), *REPO.glob("data_specs/*.md")]:
        assert f"cloob/_data_specs/{src.relative_to(REPO / 'data_specs').as_posix()}" in files, src
    for src in [*REPO.glob("cloob/recipes/*.yaml"), *REPO.glob("cloob/studies/*.yaml"), *REPO.glob("cloob/model_configs/*.json"),
                REPO / "cloob/results/paper_zero_shot.csv"]:
        assert src.relative_to(REPO).as_posix() in files, src


@pytest.mark.slow
def test_installed_wheel_prepares_the_demo(unpacked, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing found relative to the cwd
    elsewhere.mkdir()
    code = ("import json, sys, cloob, cloob.config, cloob.model\n"
            "from cloob.specfile import SPECS_DIR, shipped_specs\n"
            "from cloob.evaluate.sets.spec import SPECS_DIR as DS, list_downstream_specs\n"
            "print(json.dumps({'cloob': cloob.__file__, 'specs': str(SPECS_DIR), 'downstream': str(DS),\n"
            "  'recipes': str(cloob.config.RECIPES_DIR), 'shipped': shipped_specs(),\n"
            "  'sets': list_downstream_specs(generated=True), 'tiny': cloob.config.load_recipe('tiny').model.arch}))\n")
    proc = _python(unpacked, elsewhere, code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    for key in ("cloob", "specs", "downstream", "recipes"):  # inside the installed package
        assert Path(found[key]).is_relative_to(unpacked / "cloob"), (key, found[key])
    assert found["shipped"] == sorted(p.stem for p in REPO.glob("data_specs/*.yaml"))
    assert found["sets"] == sorted(p.stem for p in REPO.glob("data_specs/downstream/*.yaml"))

    out = tmp_path / "demo"
    code = ("import sys, cloob\n"
            "assert cloob.__file__.startswith(sys.argv[1]), cloob.__file__\n"
            "from flows.cli import main\n"  # the installed `cloob` command's entry point
            "sys.exit(main(sys.argv[2:]))\n")
    proc = _python(unpacked, elsewhere, code, "prepare", "demo", "--out", str(out), "--set", "source.samples=64",
                   "--set", "download.shard_size=32", "--set", "download.processes=1", "--set",
                   "download.image_size=32", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "64 rows -> 64 images in 2 shards" in proc.stdout
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
