"""Task-run names that say what a run does (method, set, checkpoint step), read from its parameters.

Prefect calls these when a task run starts (`task_run_name=`); they read no store and fall back to
something plain when a parameter is not what they expect, since a name must never fail a run.
"""

from __future__ import annotations

import posixpath
import re

from prefect.runtime import task_run


def with_data(overrides: list[str], data: list[dict] | None) -> list[str]:
    """A train task's overrides: data.train from prepare_data's results (passed as results, so the
    graph shows the edge prepare_data -> train), before the others."""
    return [f"data.train={','.join(d['uri'] for d in data)}", *overrides] if data else list(overrides)


def artifact_key(prefix: str, name: str) -> str:
    """`<prefix>-<name>` as an artifact key (lowercase letters, digits and dashes only)."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def progress_key(run_id: str) -> str:
    """The key of a training's progress artifact, by its run, so that the Artifacts page finds each
    run's progress."""
    return artifact_key("train", run_id)


def _params() -> dict:
    return task_run.parameters or {}


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(str(uri).rstrip("/")))[0]


def run_of_recipe(recipe: str, overrides: list[str]) -> str:
    """The run id cloob train gives (<recipe>-<method>-...[-<data version>]-<hash>), or the recipe's name."""
    try:
        from cloob.config import load_recipe
        from cloob.run.state import identify

        return load_recipe(recipe, identify(recipe, list(overrides or []))).run_id()
    except Exception:
        return _stem(recipe)


def checkpoint_label(uri: str) -> str:
    """`<run>-step<N>` for .../runs/<run>/checkpoints/step_000000N (ours), else the file or folder name."""
    parts = str(uri).rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == "checkpoints" and (m := re.fullmatch(r"step_0*(\d+)", parts[-1])):
        return f"{parts[-3]}-step{m.group(1)}"
    return _stem(uri)


def summary_label(run: dict) -> str:
    """`<run>-step<N>` of a train task's result."""
    return f"{posixpath.basename(str(run.get('run_dir', '')).rstrip('/'))}-step{run.get('step')}"


def prepare_data_name() -> str:
    return f"prepare-{_stem(_params().get('spec', 'data'))}"


def prepare_downstream_name() -> str:
    return f"prepare-downstream-{_params().get('name')}"


def _train_run() -> str:
    p = _params()
    try:
        overrides = with_data(p.get("overrides") or [], p.get("data"))
    except (TypeError, KeyError):
        overrides = list(p.get("overrides") or [])
    return run_of_recipe(p.get("recipe", "?"), overrides)


def train_name() -> str:
    return f"train-{_train_run()}"


def train_remote_name() -> str:
    return f"train-{_train_run()}-on-{_params().get('deployment')}"


def register_name() -> str:
    run = _params().get("run")
    return f"register-{summary_label(run)}" if isinstance(run, dict) else "register"


def evaluate_name() -> str:
    p = _params()
    return f"evaluate-{checkpoint_label(p.get('checkpoint', '?'))}-on-{p.get('dataset')}"


def evaluate_remote_name() -> str:
    p = _params()
    return f"evaluate-{checkpoint_label(p.get('checkpoint', '?'))}-on-{p.get('dataset')}-via-{p.get('deployment')}"
