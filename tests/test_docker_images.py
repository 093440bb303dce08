"""The worker images' Dockerfiles as data (no docker needed): the lock installed frozen without the
dev group, tini as PID 1, uv pinned, the base images matching the locked Python and CUDA. Building and
running the CPU image for real is docker/check (opt-in, not part of this suite)."""

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _base_args(path: Path) -> dict[str, str]:
    """The build arguments declared before the first FROM, with their defaults (what FROM may use)."""
    args = {}
    for word, rest in _instructions(path):
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def _stages(path: Path) -> tuple[dict[str, str], str]:
    """The FROM lines with the default build arguments put in: ({stage name: image}, the final image)."""
    args, named, last = _base_args(path), {}, ""
    for word, rest in _instructions(path):
        if word == "FROM":
            image, *alias = rest.split()
            last = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
            if alias:
                assert alias[0].upper() == "AS", rest
                named[alias[1]] = last
    return named, last


def _locked_versions() -> dict:
    return {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_installs_the_lock_frozen_and_runs_under_tini(name):
    ins = _instructions(DOCKER / name)
    # Both images from build arguments (local stand-ins where the registries cannot be reached), their
    # defaults pinned by tag: the uv stage and the base, in that order.
    assert list(_base_args(DOCKER / name)) == ["BASE_IMAGE", "UV_IMAGE"]
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${UV_IMAGE} AS uv", "${BASE_IMAGE}"]
    stages, base = _stages(DOCKER / name)
    for image in (base, *stages.values()):
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
    runs = [rest for word, rest in ins if word == "RUN"]
    # Dependencies from the lock alone (no resolution in the build), without the dev group (pytest, moto):
    assert any("uv sync --frozen --no-dev --no-install-project" in r for r in runs)
    assert any(re.search(r"uv sync --frozen --no-dev(?! --no-install-project)", r) for r in runs)
    assert "dev" in _locked_versions()["cloob"]["dev-dependencies"]  # there is a dev group to leave out
    copies = [rest for word, rest in ins if word == "COPY" and not rest.startswith("--from")]
    assert copies[0].split()[:-1] == ["pyproject.toml", "uv.lock", "README.md"]  # the dependency layer first
    for c in copies:
        for src in c.split()[:-1]:
            assert (ROOT / src).exists(), src
    assert {c.split()[0] for c in copies[1:]} >= {"cloob", "flows", "data_specs", "deploy"}
    uv = [rest for word, rest in ins if word == "COPY" and rest.startswith("--from")]
    assert uv == ["--from=uv /uv /uvx /usr/local/bin/"]
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", stages["uv"])  # uv pinned too
    assert any("tini" in r and "apt-get install" in r for r in runs)
    assert ('ENTRYPOINT', '["tini", "--"]') in ins
    # BuildKit reads <Dockerfile>.dockerignore: the context is the repository root, .venv alone ~6 GB.
    ignored = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {".venv/", ".git/", "docker/.env"} <= set(ignored)
    cmd = json.loads(dict(ins)["CMD"])
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--type") + 1] == "process"


def test_dockerfile_bases_match_the_locked_python_and_cuda():
    locked = _locked_versions()
    cpu = _stages(DOCKER / "Dockerfile.cpu")[1]  # the default BASE_IMAGE
    gpu = _stages(DOCKER / "Dockerfile.gpu")[1]
    py = re.fullmatch(r"python:3\.(\d+)\.\d+-slim-\w+", cpu)
    assert py, cpu
    assert any(f"cp3{py.group(1)}-manylinux" in w["url"] for w in locked["torch"]["wheels"])
    assert "UV_PYTHON=3.11" in (DOCKER / "Dockerfile.gpu").read_text() and py.group(1) == "11"
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-base-ubuntu\d+\.\d+", gpu)
    assert cuda, gpu
    # The locked torch brings its CUDA as nvidia-*-cuNN wheels: the base image's CUDA (what the driver
    # must support) has to be that major version.
    majors = {m for d in locked["torch"]["dependencies"] for m in re.findall(r"-cu(\d+)$", d["name"])}
    assert majors == {cuda.group(1)}, (majors, gpu)
    # A base given as --build-arg must have the Python the CPU image's uv is told to use.
    assert "UV_PYTHON=/usr/local/bin/python3.11" in (DOCKER / "Dockerfile.cpu").read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_has_no_syntax_line(name):
    # `# syntax=docker/dockerfile:1` makes BuildKit pull a frontend from Docker Hub at every build, and
    # the build stops there when Docker Hub cannot be reached; the built-in frontend builds these files.
    # Parser directives (`# syntax=`, `# escape=`, case and spaces free) count only at the very top.
    lines = (DOCKER / name).read_text().splitlines()
    directives = [x for x in lines[:5] if re.match(r"#\s*(syntax|escape)\s*=", x, re.I)]
    assert not directives, directives
    assert not any(re.match(r"#\s*syntax\s*=", x, re.I) for x in lines)


def test_docker_check_is_an_executable_bash_script_that_explains_itself():
    # docker/check builds and runs the image (opt-in: 10-20 min, ~25 GB): here only what costs nothing,
    # its syntax and its arguments, which are read before anything is installed or built.
    check = DOCKER / "check"
    assert os.access(check, os.X_OK)
    subprocess.run(["bash", "-n", str(check)], check=True)
    help_ = subprocess.run([str(check), "--help"], capture_output=True, text=True, timeout=30)
    assert help_.returncode == 0, help_.stderr
    for option in ("--workdir", "--keep-image", "--head", "--steps"):
        assert option in help_.stdout
    wrong = subprocess.run([str(check), "--no-such-option"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "unknown option --no-such-option" in wrong.stderr
    # It reads the stand-ins' versions from the Dockerfile's build arguments, as `ARG NAME=default` lines.
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"(?m)^ARG BASE_IMAGE=\S+$", text) and re.search(r"(?m)^ARG UV_IMAGE=\S+:\d+\.\d+\.\d+$", text)
