"""Training recipes: typed, validated configuration loaded from YAML with dotted overrides.

A recipe is a YAML file (or the name of one shipped in cloob/recipes/) with the sections below.
Every field has a default that works for the tiny CPU run; `key.sub=value` overrides on the command
line are parsed as YAML scalars. An invalid field raises CloobError naming the field and a fix.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from cloob.errors import CloobError
from cloob.methods import METHODS
from cloob.names import check_name

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: str = Field("cloob-tiny-vit", description="open_clip architecture name, or a cloob-tiny-* config")
    inv_tau: float = Field(30.0, ge=1.0, le=100.0, description="initial 1/tau, stored as log in logit_scale")
    learn_inv_tau: bool = False
    grad_checkpointing: bool = False
    compile: bool = False


class LossConfig(_Section):
    method: str = Field("cloob", description="a method of cloob/methods.py: clip, cloob, infoloob, ...",
                        json_schema_extra={"enum": list(METHODS)})
    beta: float = Field(8.0, gt=0.0, description="Hopfield inverse temperature (scale_hopfield), fixed")
    # How the loss is computed, not what: every choice gives the same loss and gradients (to float32
    # rounding), so these are left out of the content hash, as the number of ranks is (a run can
    # resume on other hardware). cloob/losses/plan.py has the costs.
    distributed: Literal["sharded", "replicated"] = Field(
        "sharded", description="under DDP: each rank computes the loss rows of its own pairs against the "
        "gathered batch (sharded, O(N^2/W) per rank), or every rank the whole global batch's loss "
        "(replicated, the 2022 reference's scheme)")
    blocked: bool | Literal["auto"] = Field(
        "auto", description="compute the loss block_rows rows at a time, recomputing the scores in the "
        "backward pass: O(N d) memory instead of O(N^2); auto: when the N x N buffers would not fit")
    block_rows: int | None = Field(None, ge=1, description="rows per block of the blocked loss; default: "
                                   "about 64 MiB of scores per block")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:  # the one list, read at validation time
            raise ValueError(f"not a method: choose one of {', '.join(METHODS)} (cloob/methods.py)")
        return v

    @property
    def objective(self) -> str:
        return METHODS[self.method].objective

    @property
    def retrieval(self) -> str:
        return METHODS[self.method].retrieval


class DataConfig(_Section):
    train: str = Field(
        "", description="shards: a folder or fsspec URL holding NNNNN.tar + NNNNN_stats.json, "
        "a brace pattern (s3://b/p/{00000..00099}.tar) or a glob"
    )
    num_samples: int | None = Field(None, gt=0, description="override the count read from *_stats.json")
    resampled: bool = True
    shuffle_buffer: int = Field(1000, ge=0)
    workers: int = Field(2, ge=0)
    # Set by the launcher (cloob.run.state.identify), not by hand: what data.train resolves to. With a
    # content hash the run is keyed by the data's content, not by data.train's place, so a new version
    # of the data in the same folder is a new run and the same version in another place is the same.
    content_hash: str | None = Field(None, description="the content hash of the data version trained on "
                                     "(its manifest's), set by the launcher; none: data.train's place keys the run")
    version: str | None = Field(None, description="the data version's name for the run's name (mytable-v2), set "
                                "by the launcher with content_hash")
    # Unset (PIL) is left out of the hash, so runs made before the field existed keep their keys.
    decoder: Literal["pil", "torchvision"] | None = Field(
        None, description="how the training reader decodes and crops: pil (none: the default, open_clip's own "
        "transform) or torchvision (decode_jpeg + torch's resize: the same crops, pixels equal up to rounding, "
        "about half the CPU a sample; cloob/data/tensor_transform.py)")


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0)


class ScheduleConfig(_Section):
    name: Literal["cosine", "cosine_restarts", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    restarts: int = Field(1, ge=1, description="number of cosine cycles for cosine_restarts")


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1, description="per rank; the global batch is batch_size x world size")
    epochs: float | None = Field(1.0, gt=0.0)
    steps: int | None = Field(None, gt=0, description="total optimizer steps; overrides epochs")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # The store's root, as in the demo and the pipeline (train.output=<store>): not part of the
    # recipe hash, so changing this default (it was ./runs, which gave ./runs/runs/<run>) changes no run name.
    output: str = Field(".", description="folder or fsspec URL under which runs/<run_name> is written")
    run_name: str | None = Field(None, description="default: <recipe>-<method>[-<what the command line changed>]"
                                 "[-<data version>]-<recipe hash>, so a rerun resumes")
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    init_from: str | None = Field(None, description="warm start: a registered model (an alias such as champion, "
                                  "an entry id) or a checkpoint folder/URL; its weights only, a fresh optimizer "
                                  "and schedule; the run records it as its parent")
    # Set by the launcher from init_from (cloob.run.state.identify): the checkpoint's folder and model
    # sha256. The sha256 keys the run (an alias moves, the weights it meant do not).
    init_checkpoint: str | None = Field(None, description="set by the launcher: the checkpoint init_from resolved to")
    init_sha256: str | None = Field(None, description="set by the launcher: that checkpoint's model sha256")
    init_entry: str | None = Field(None, description="set by the launcher: the registry entry init_from named")
    resume: bool = True
    progress: bool = True
    # Where the metrics go besides metrics.jsonl (always written): cloob/train/tracking.py's SINKS.
    report_to: list[str] = Field(["tensorboard"], description="tracking backends, as open_clip's --report-to: "
                                 "tensorboard, wandb, both (tensorboard,wandb) or none; wandb reads WANDB_MODE, "
                                 "WANDB_PROJECT (docs/tracking.md)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v) -> list[str]:
        from cloob.train.tracking import parse_report_to  # the one list of backends

        try:
            return parse_report_to(v if v is None or isinstance(v, (str, list, tuple)) else str(v))
        except CloobError as e:
            raise ValueError(f"{e.problem}; {e.fix}") from None

    @field_validator("init_from")
    @classmethod
    def _no_init(cls, v: str | None) -> str | None:
        # A study's sweep writes None as `train.init_from=None`: from scratch, as null and "" are.
        return None if v is None or v.strip().lower() in ("", "none", "null") else v.strip()
    # How the run is supervised, not what it computes (left out of the content hash, see below).
    watchdog_s: float | None = Field(None, ge=0.0, description="fail the run when a rank finishes no step "
                                     "for this long; default: automatic (cloob/run/watchdog.py); 0: off")
    process_group_timeout_s: float = Field(1800.0, gt=0.0, description="how long a collective waits "
                                           "for a rank before the run fails")
    # Faults of long runs (cloob/train/preemption.py, cloob/train/nonfinite.py, cloob/run/launch.py).
    stop_grace_s: float = Field(120.0, gt=0.0, description="after SIGTERM, how long the ranks have to finish "
                                "their step and write its checkpoint before they are killed")
    max_restarts: int = Field(0, ge=0, description="how often torchrun restarts the group after a rank dies; "
                              "it resumes from the last checkpoint")
    # 10: a healthy fp32/bf16 run never has a non-finite step; a few in a long run (a rare spike, one odd
    # batch) are survivable when skipped, but ten mean it is diverging, and more skips only waste steps.
    max_nonfinite_steps: int = Field(10, ge=0, description="steps with a NaN/inf loss or gradient that are "
                                     "skipped (no optimizer step) before the run stops; 0: stop at the first")


# train.* fields that do not change what a healthy run computes; left out of Recipe.content_hash.
RUNTIME_FIELDS = ("output", "run_name", "progress", "resume", "watchdog_s", "process_group_timeout_s",
                  "stop_grace_s", "max_restarts", "max_nonfinite_steps", "report_to")
# loss.* fields that choose how the same loss is computed; likewise.
LOSS_EXECUTION_FIELDS = ("distributed", "blocked", "block_rows")
# train.* fields that keep or log and do not change the weights. They entered the hash before this was
# seen, so to keep the byte form of every hash made then the hash takes the value the recipe itself
# (its file, before any override) gives them: an override of these changes neither hash nor name.
RETENTION_FIELDS = ("keep_checkpoints", "log_every")
# Fields the launcher sets (data identity, warm start); absent from the hash while unset, so that a run
# without them keeps its hash.
_DATA_PLACE = ("train", "content_hash", "version")
_INIT_FIELDS = ("init_from", "init_checkpoint", "init_sha256", "init_entry")


def trajectory_fields(recipe: Recipe) -> dict:
    """What decides a run's weights, apart from where it starts (the warm start) and where its data
    lies (data.train, when the data's content hash is known): for comparing two runs' recipes.
    Retention and runtime fields are out, as in Recipe.content_hash."""
    d = recipe.model_dump(mode="json")
    for k in (*RUNTIME_FIELDS, *RETENTION_FIELDS, *_INIT_FIELDS):
        d["train"].pop(k, None)
    for k in LOSS_EXECUTION_FIELDS:
        d["loss"].pop(k, None)
    d["data"].pop("version", None)
    if d["data"].get("content_hash"):
        d["data"].pop("train", None)
    return d


class Recipe(_Section):
    name: str = "tiny"
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    # RETENTION_FIELDS as the recipe gave them before overrides (load_recipe); None: as they are.
    _hashed_retention: dict | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_length(self) -> Recipe:
        if self.train.steps is None and self.train.epochs is None:
            raise ValueError("set train.steps or train.epochs")
        return self

    def content_hash(self, legacy: bool = False) -> str:
        """sha256 of the fields that change the trajectory (not output location, console flags or
        supervision limits: a rerun with a longer watchdog must resume the same run, and the hash of
        every recipe written before these fields existed stays what it was).

        With data.content_hash set, the data enters by its content hash instead of data.train's place;
        with train.init_sha256 set, the warm start's weights by their sha256. Unset, both are left out
        and the hash is byte for byte what it was before they existed.
        legacy: the form before data identity and retention were taken out (every field as it is, no
        data content hash): the key of runs made before, which still resume (cloob.run.state)."""
        d = self.model_dump(mode="json")
        for k in RUNTIME_FIELDS:
            d["train"].pop(k)
        for k in LOSS_EXECUTION_FIELDS:
            d["loss"].pop(k)
        data, train = d["data"], d["train"]
        content = data.pop("content_hash")
        data.pop("version")
        if data.get("decoder") is None:
            data.pop("decoder")
        init_sha = train.pop("init_sha256")
        for k in ("init_from", "init_checkpoint", "init_entry"):
            train.pop(k)
        if init_sha:
            train["init_sha256"] = init_sha
        if not legacy:
            train.update(self._hashed_retention or {})
            if content:
                data.pop("train")
                data["content_hash"] = content
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def run_keys(self) -> set[str]:
        """The recipe hashes a run of this recipe may carry in its checkpoints: its content hash and, where
        no data content hash is set, the legacy form (a run made before the data and retention fields
        left the key, found by cloob.run.state.identify); with one set, the run is of that data only."""
        return {self.content_hash()} if self.data.content_hash else {self.content_hash(),
                                                                     self.content_hash(legacy=True)}

    def data_label(self) -> str:
        """What the run's name says of its data: the version (mytable-v2), when the launcher resolved one."""
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", self.data.version or "").strip("-") if self.data.content_hash else ""

    def default_run_name(self, differs: str = "", legacy: bool = False) -> str:
        """<recipe>-<method>[-<differs>][-<data version>]-<hash>: the method in every name, so CLOOB and CLIP
        runs of one recipe are told apart in folders, tables, TensorBoard and Prefect; the data version, so
        runs on two versions are; the hash keeps it unique and makes a rerun of the same content find
        (and resume) the same folder. legacy: the name a run got before data versions (no version, the
        legacy hash)."""
        data = "" if legacy else self.data_label()
        return "-".join(p for p in (self.name, self.loss.method, differs, data, self.content_hash(legacy)[:10]) if p)

    def run_id(self) -> str:
        """The run's name: train.run_name, or the default_run_name load_recipe gave it."""
        return self.train.run_name or self.default_run_name()

    def run_dir(self) -> str:
        """Where `cloob train` writes this recipe's run (checkpoints, metrics)."""
        return posixpath.join(self.train.output.rstrip("/"), "runs", self.run_id())


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise CloobError(f"override {dotted!r}: {k!r} is not a section", "use section.field=value")
        cur = nxt
    cur[keys[-1]] = value


def resolve_recipe_path(recipe: str | Path) -> Path:
    p = Path(recipe)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise CloobError(
        f"recipe {str(recipe)!r} is neither a file nor a shipped recipe",
        f"pass a YAML path or one of: {', '.join(names)}",
    )


def load_recipe(recipe: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe; overrides are `section.field=value` strings."""
    if isinstance(recipe, dict):
        data, source = dict(recipe), "<dict>"
    else:
        path = resolve_recipe_path(recipe)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise CloobError(f"recipe {source} is not valid YAML: {e}", "fix the YAML syntax") from None
        if not isinstance(data, dict):
            raise CloobError(f"recipe {source} must be a mapping of sections", "see cloob/recipes/tiny.yaml")
    own = data.get("train") if isinstance(data.get("train"), dict) else {}
    retention = {k: own[k] for k in RETENTION_FIELDS if k in own}
    for ov in overrides or []:
        if "=" not in ov:
            raise CloobError(f"override {ov!r} has no '='", "write overrides as section.field=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "recipe"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling; see cloob/recipes/tiny.yaml for all fields)"
            lines.append(f"{loc}: {msg} (got {err.get('input')!r})")
        raise CloobError(
            f"invalid recipe {source}: " + "; ".join(lines),
            "correct the field in the recipe or pass section.field=value",
        ) from None
    defaults = TrainConfig()
    r._hashed_retention = {k: int(retention.get(k, getattr(defaults, k))) for k in RETENTION_FIELDS}
    if r.train.run_name is None:
        check_name(r.name, "recipe name")  # the default run name starts with it
        # Fixed here, where the overrides are known, and carried in the recipe (train.run_name is not
        # in the content hash), so that a recipe dumped and reloaded keeps its name.
        r.train.run_name = r.default_run_name(_differs(overrides or []))
    check_name(r.train.run_name, "train.run_name")  # the run's folder: <train.output>/runs/<run name>/
    return r


# What an override changes that is worth a word in the run's name: content fields only (the data's
# place, the output folder, where and how often it saves, logs or runs are not what a run learns; the
# method is named anyway), at most this many characters, so names stay short; the hash tells the rest apart.
_DIFFERS_MAX = 32
_UNNAMED = {"checkpoint_every", "keep_checkpoints", "log_every", "device", *_INIT_FIELDS}


def _differs(overrides: list[str]) -> str:
    parts, used = [], 0
    # The value that runs: an override given twice is named once, with its last value (load_recipe's).
    final = {}
    for ov in overrides:
        key, raw = (x.strip() for x in ov.split("=", 1))
        final.pop(key, None)
        final[key] = raw
    for key, raw in final.items():
        leaf = key.rsplit(".", 1)[-1]
        if key == "loss.method" or key.startswith("data.") or leaf in RUNTIME_FIELDS or leaf in _UNNAMED or (
                key.startswith("loss.") and leaf in LOSS_EXECUTION_FIELDS):
            continue
        part = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{leaf}{raw}").strip("_")
        if part and used + len(part) <= _DIFFERS_MAX:
            parts.append(part)
            used += len(part) + 1
    return "-".join(parts)
