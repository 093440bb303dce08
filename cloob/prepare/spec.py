"""Pretraining dataset specs: where the rows come from and how img2dataset turns them into shards.

A spec is a YAML file in data_specs/ (or any path). `source` says where the (url, caption) rows come
from; `download` holds img2dataset's settings. The spec's content hash covers everything that changes
what lands in the shards (source, image processing, shard size) and leaves out what only changes how
fast it gets there (processes, threads, timeouts), so a re-run with more processes resumes the same
dataset instead of starting a new one.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from cloob.errors import CloobError
from cloob.names import check_name, pydantic_name
from cloob.prepare.distributors import DISTRIBUTORS
from cloob.prepare.distributors import names as distributor_names
from cloob.specfile import SPECS_DIR, read_spec_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TableSource(_Strict):
    """Your own url/caption list: a TSV, CSV or parquet file (local or any fsspec URL)."""

    kind: Literal["table"]
    path: str | None = Field(None, description="the table, or a glob of tables read in name order (daily "
                             "dumps: /data/dumps/*.tsv); or pass --input on the command line")
    format: Literal["tsv", "csv", "parquet"] | None = Field(None, description="default: from the suffix")
    url_col: str = "url"
    caption_col: str = "caption"
    key: str | None = Field(None, description="column that identifies a row across re-exports of the table "
                            "(a later preparation matches rows on it); default: the row's url and caption")

    @model_serializer(mode="wrap")
    def _unset_key_left_out(self, handler):
        # Unset, the field is left out of the dump: spec.json, the manifest's spec and every hash
        # made from them keep the bytes they had before the field existed.
        data = handler(self)
        if data.get("key", "") is None:
            data.pop("key")
        return data


class Cc3mSource(_Strict):
    """Conceptual Captions: Google's TSV, caption<TAB>url, no header. The user downloads it."""

    kind: Literal["cc3m"]
    path: str | None = Field(None, description="Train_GCC-training.tsv; or pass --input")
    download_page: str = "https://ai.google.com/research/ConceptualCaptions/download"


class Yfcc15mSource(_Strict):
    """OpenAI's YFCC15M subset list joined on photo id with the YFCC100M metadata (cloob.prepare.yfcc):
    the Multimedia Commons SQLite database, the original release's ten 23-column files, or the
    single 25-column file."""

    kind: Literal["yfcc15m"]
    subset: str = "https://openaipublic.azureedge.net/clip/data/yfcc100m_subset_data.tsv.bz2"
    metadata: str | list[str] | None = Field(
        None, description="yfcc100m_dataset.sql, the ten yfcc100m_dataset-N(.bz2) (a list) or "
        "yfcc100m_dataset(.bz2); or pass --input (once per file)")
    caption_rule: Literal["title", "description", "title_description", "longest"] = "title_description"


class DemoSource(_Strict):
    """Generated shape pictures with captions that describe them, served from 127.0.0.1."""

    kind: Literal["demo"]
    samples: int = Field(2048, gt=0)
    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024, description="size the local server renders at")
    max_items: int = Field(3, ge=1, le=3)


# Where a source's files are (not what they hold): left out of the dataset's content hash, whose
# rows digest covers what was read from them (see PretrainSpec.content_hash).
_LOCATIONS = {"path", "metadata", "subset", "download_page"}

# Download fields that only change speed or robustness, not what a successful sample contains.
# Where the work runs is one of them: the same rows give the same shards under every distributor.
_OPERATIONAL = {"processes", "threads", "timeout", "deadline", "retries", "max_bytes", "distributor"}

Source = Annotated[TableSource | Cc3mSource | Yfcc15mSource | DemoSource, Field(discriminator="kind")]


class DownloadSettings(_Strict):
    """img2dataset's settings (names as in img2dataset where they exist)."""

    image_size: int = Field(256, ge=8)
    # img2dataset's default "border" pads to a square; CLIP-style training crops, so keep the ratio.
    resize_mode: Literal["keep_ratio", "keep_ratio_largest", "center_crop", "border", "no"] = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    shard_size: int = Field(10_000, gt=0, description="samples per shard (number_sample_per_shard)")
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(1.0e8, gt=0, description="width x height above which an image is refused")
    max_aspect_ratio: float = Field(math.inf, gt=0)
    distributor: str = Field(
        "multiprocessing", description="img2dataset's: this machine's processes, a Spark or a Ray cluster "
        "(--cluster; extras spark, ray): a name in cloob/prepare/distributors.py's DISTRIBUTORS",
        json_schema_extra={"enum": distributor_names()})
    processes: int = Field(4, gt=0, description="worker processes; for pyspark/ray, the cores of a local cluster")
    threads: int = Field(64, gt=0)
    timeout: float = Field(10.0, gt=0, description="seconds to connect and between received bytes")
    deadline: float = Field(60.0, gt=0, description="seconds for one whole download (stops tricklers)")
    max_bytes: int = Field(50 * 2**20, gt=0, description="largest response body accepted")
    retries: int = Field(2, ge=0, description="extra attempts for a failed download")
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] | None = None  # None: img2dataset's list (noai, ...)

    @field_validator("distributor")
    @classmethod
    def _known_distributor(cls, v: str) -> str:
        if v not in DISTRIBUTORS:  # the one table, read at validation time
            raise ValueError(f"Input should be one of {', '.join(DISTRIBUTORS)} (cloob/prepare/distributors.py)")
        return v


class PretrainSpec(_Strict):
    name: Annotated[str, AfterValidator(pydantic_name)]
    description: str = ""
    licence: str = ""
    source: Source
    download: DownloadSettings = DownloadSettings()
    limit: int | None = Field(None, gt=0, description="take only the first N source rows")

    @field_validator("download", mode="before")
    @classmethod
    def _none_is_default(cls, v):
        return {} if v is None else v

    def content_hash(self, *, locations: bool = True) -> str:
        """sha256 of what decides the shards' contents (see the module docstring).

        With locations=False it leaves out where the source files are (source.path, .metadata,
        .subset): the manifest's content hash takes that one with the rows' own digest, so the same
        rows read from another path, under another name or compression (or, for YFCC, from another
        of its metadata forms) give the same dataset hash. The folder's owner and the rows' reuse
        keep the full hash: another input there means rows read again."""
        data = self.model_dump(mode="json")
        for k in _OPERATIONAL:
            data["download"].pop(k, None)
        data.pop("description"), data.pop("licence")
        if not locations:
            for k in _LOCATIONS:
                data["source"].pop(k, None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


    def differences(self, other: dict) -> list[str]:
        """The content fields in which this spec differs from `other` (a spec as recorded by cloob
        prepare), as `field old -> new`: what a user needs to see when a folder holds another spec."""
        def flat(d: dict, prefix: str = "") -> dict:
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out

        mine = flat(self.model_dump(mode="json"))
        theirs = flat(other or {})
        skip = {"description", "licence", *(f"download.{k}" for k in _OPERATIONAL)}
        return [f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(mine) | set(theirs))
                if k not in skip and mine.get(k) != theirs.get(k)]


class SpecChanged(CloobError):
    """The output folder holds a dataset prepared from another spec; `differences` says how."""

    def __init__(self, problem: str, fix: str, differences: list[str]):
        super().__init__(problem, fix)
        self.differences = differences

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise CloobError(f"override {item!r} is not key=value", "write e.g. download.processes=16")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value else None


def load_spec(spec: str | Path | dict, overrides: list[str] | None = None) -> PretrainSpec:
    """Load and validate a spec from a path, a shipped name (data_specs/<name>.yaml) or a dict."""
    if isinstance(spec, dict):
        data, origin = dict(spec), "<dict>"
    else:
        data, path = read_spec_file(spec, SPECS_DIR, "dataset spec", "data_specs/demo.yaml", empty_ok=True)
        origin = str(path)
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CloobError(f"override {item!r}: {k} is not a section", "check the key path")
        node[keys[-1]] = value
    if isinstance(data, dict) and "name" in data:  # datasets/<name>/ and more: checked before anything runs
        check_name(data["name"], "dataset spec name")
    try:
        return PretrainSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise CloobError(f"dataset spec {origin}: {field}: {err['msg']}",
                         f"fix {field} (see data_specs/*.yaml; {len(e.errors())} problem(s) in all)") from None
