"""Import boundaries: the light modules stay light, and cloob never imports Prefect.

Loading a recipe, listing recipes, planning a deployment, the registry and the results table must
start in well under a second: each is imported here in a fresh interpreter, and torch, open_clip
and prefect must not be loaded by it. Every cloob module is imported too, and none may pull in
prefect (cloob/ must run under bare torchrun on a GPU node with torch and a few wheels)."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import cloob

ROOT = Path(__file__).parents[1]
HEAVY = ("torch", "open_clip", "prefect")

LIGHT = [
    "cloob.config", "cloob.methods", "cloob.errors", "cloob.storage", "cloob.version", "cloob.cli",
    "cloob.train", "cloob.train.checkpoint", "cloob.train.plan", "cloob.architectures",
    "cloob.run", "cloob.run.launch", "cloob.run.state",
    "cloob.run.lifeline", "cloob.registry", "cloob.registry.lineage", "cloob.results.table",
    "cloob.results.report", "cloob.prepare.spec", "cloob.prepare.run", "cloob.prepare.manifest",
    "cloob.evaluate.sets", "flows.deploy",
]


def _loaded_after_import(modules: list[str]) -> dict[str, list[str]]:
    """{module: heavy packages in sys.modules after importing it alone in a new interpreter}."""
    code = (
        "import importlib, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "m = sys.argv[1]\n"
        "importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} & set(heavy))))\n"
    )
    out = {}
    for m in modules:
        proc = subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert proc.returncode == 0, (m, proc.stderr[-2000:])
        out[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_light_modules_load_no_torch_open_clip_or_prefect():
    loaded = _loaded_after_import(LIGHT)
    assert {m: h for m, h in loaded.items() if h} == {}


def _all_cloob_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(cloob.__path__, "cloob."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def test_no_cloob_module_imports_prefect():
    modules = _all_cloob_modules()
    assert len(modules) > 30  # the walk found the package, not an empty folder
    code = (
        "import importlib, json, sys\n"
        "bad = {}\n"
        "for m in sys.argv[1:]:\n"
        "    importlib.import_module(m)\n"
        "    if 'prefect' in sys.modules:\n"
        "        bad[m] = True\n"
        "        break\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_the_source_of_cloob_never_names_prefect():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "cloob").rglob("*.py")
                 if any(line.split("#")[0].strip().startswith(("import prefect", "from prefect"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
