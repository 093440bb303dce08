"""Per-image outcomes of an evaluation: what a paired comparison of two models needs.

A results row holds aggregate metrics only. Beside it, `<results>/outcomes/<row_uuid>.npz` (numpy's
compressed npz, no pickle) keeps, for every image the row scored, in the order they were scored:

    ids       int64   the image's identity: the first 8 bytes of blake2b(its name in the set), the
                      name being its path under the set's folder, or `<shard file>#<n>` in shards
    labels    int32   its class index (zero-shot); -1 for retrieval
    correct   bool    whether the model's first answer was right: top-1 class (zero-shot), the
                      image's own caption ranked first (retrieval, i2t@1)
    meta      str     JSON: row_uuid, checkpoint_id, dataset, dataset_hash, eval_settings_hash,
                      main_metric, format

About 9 to 11 bytes an image once compressed, most of it the id (a hash does not compress): the
demo's 360 shapes images take 4.1 kB, ImageNet's 50,000 about 0.5 MB. The file is written
before its row, atomically (cloob.storage.Location), so a row that exists has its outcomes unless it
was written by a version that kept none (those rows compare on their means only). Two rows are
paired by their ids, which are checked to be the same images, never assumed.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from cloob.storage import Location

FOLDER = "outcomes"
FORMAT = 1


def image_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def image_ids(names: list[str]) -> np.ndarray:
    return np.fromiter((image_id(n) for n in names), dtype=np.int64, count=len(names))


@dataclass
class Outcomes:
    ids: np.ndarray
    labels: np.ndarray
    correct: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.ids)


def rel_path(row_uuid: str) -> str:
    return f"{FOLDER}/{row_uuid}.npz"


def write(results_uri: str, row: dict, ids: np.ndarray, labels: np.ndarray, correct: np.ndarray) -> str:
    """Write the outcomes of `row` (before the row itself is appended); returns the file's URI."""
    ids, labels, correct = (np.asarray(ids, np.int64), np.asarray(labels, np.int32), np.asarray(correct, bool))
    if not len(ids) == len(labels) == len(correct):
        raise ValueError(f"outcomes of unequal length: {len(ids)} ids, {len(labels)} labels, {len(correct)} correct")
    meta = {k: row.get(k) for k in ("row_uuid", "checkpoint_id", "dataset", "dataset_hash", "eval_settings_hash",
                                    "main_metric")}
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=ids, labels=labels, correct=correct,
                        meta=np.array(json.dumps({**meta, "format": FORMAT}, sort_keys=True)))
    loc = Location(results_uri)
    loc.write_bytes(rel_path(row["row_uuid"]), buf.getvalue())
    return loc.url(rel_path(row["row_uuid"]))


def read(results_uri: str, row_uuid: str) -> Outcomes | None:
    """The outcomes of a row; None when it has none (an older row) or they cannot be read."""
    try:
        data = Location(results_uri).read_bytes(rel_path(row_uuid))
    except FileNotFoundError:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return Outcomes(z["ids"], z["labels"], z["correct"], json.loads(str(z["meta"])))
    except (OSError, ValueError, KeyError):
        return None


def metric(main_metric: str, correct: np.ndarray, labels: np.ndarray) -> float:
    """The row's main metric from its outcomes: top1 and i2t_r1 are the mean of `correct`,
    mean_per_class_recall the mean over the classes present of each class's mean."""
    if main_metric == "mean_per_class_recall":
        classes = np.unique(labels)
        return float(np.mean([correct[labels == c].mean() for c in classes]))
    return float(np.mean(correct))


SUPPORTED = ("top1", "i2t_r1", "mean_per_class_recall")
