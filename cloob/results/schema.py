"""The results table's columns: one row per (run, checkpoint, dataset) evaluation.

Metrics are fractions in [0, 1] (accuracy 0.2133, not 21.33); reports show percent. Columns that do
not apply to a row's task are null (a retrieval row has no top1; a zero-shot row has no recall@k).
The schema is fixed so that part files written by different processes, hosts and versions read back
as one table.
"""

from __future__ import annotations

import pyarrow as pa

from cloob.methods import METHODS

KEY = ("run_id", "checkpoint_id", "dataset")

_TS = pa.timestamp("us", tz="UTC")

COLUMNS: list[tuple[str, pa.DataType, str]] = [
    # identity
    ("run_id", pa.string(), "run name (our runs) or open_clip:<arch>:<weights file name> (external weights)"),
    ("checkpoint_id", pa.string(), "the checkpoint's model-file sha256 (content identity)"),
    ("dataset", pa.string(), "downstream set name (flowers102, ...) or retrieval set name"),
    ("task", pa.string(), "zeroshot | retrieval"),
    # the model
    ("checkpoint_uri", pa.string(), "where the weights were read (credentials stripped)"),
    ("step", pa.int64(), "optimizer step of the checkpoint; null for external weights"),
    ("method", pa.string(), " | ".join(METHODS) + " (cloob/methods.py)"),
    ("arch", pa.string(), "open_clip architecture name"),
    ("pretraining_data", pa.string(), "pretraining dataset name (cc3m, yfcc15m, demo, openai, ...)"),
    ("pretraining_hash", pa.string(), "content hash of the pretraining dataset manifest, if known"),
    ("samples_seen", pa.int64(), "training samples seen by the checkpoint, if known"),
    # the data
    ("dataset_uri", pa.string(), "where the eval set was read"),
    ("dataset_hash", pa.string(), "eval set identity: downstream spec hash + manifest/shard digests"),
    ("n_images", pa.int64(), "images scored"),
    ("n_skipped", pa.int64(), "images skipped as unreadable (corrupt, truncated, not an image)"),
    ("n_classes", pa.int64(), "zero-shot classes; null for retrieval"),
    ("dataset_warnings", pa.string(), "why a number on this set may not compare with the paper's (a count far "
                                      "from the published test size, another split); null when none"),
    # zero-shot metrics
    ("main_metric", pa.string(), "the spec's main metric name: top1 | mean_per_class_recall | i2t_r1"),
    ("main_value", pa.float64(), "value of main_metric"),
    ("top1", pa.float64(), "top-1 accuracy"),
    ("top5", pa.float64(), "top-5 accuracy (top-k with k = classes if fewer than 5)"),
    ("mean_per_class_recall", pa.float64(), "mean over classes of per-class recall"),
    # retrieval metrics
    ("i2t_r1", pa.float64(), "image-to-text recall@1"),
    ("i2t_r5", pa.float64(), "image-to-text recall@5"),
    ("i2t_r10", pa.float64(), "image-to-text recall@10"),
    ("t2i_r1", pa.float64(), "text-to-image recall@1"),
    ("t2i_r5", pa.float64(), "text-to-image recall@5"),
    ("t2i_r10", pa.float64(), "text-to-image recall@10"),
    # embedding diagnostics
    ("image_effective_eigenvalues", pa.int64(), "eigenvalues needed for 99% of the image covariance"),
    ("text_effective_eigenvalues", pa.int64(), "eigenvalues needed for 99% of the text covariance"),
    ("alignment", pa.float64(), "Wang & Isola alignment E||x-y||^2 of matched image/text pairs (lower: aligned)"),
    ("image_uniformity", pa.float64(), "Wang & Isola uniformity log E exp(-2||x-x'||^2) (lower: more uniform)"),
    ("text_uniformity", pa.float64(), "as image_uniformity, for the text embeddings"),
    ("image_ajne", pa.float64(), "Ajne/Prentice statistic n/4 - sum_{i<j} angle_ij/(pi n); ~0.25 if uniform"),
    ("text_ajne", pa.float64(), "as image_ajne, for the text embeddings"),
    # provenance
    ("eval_settings", pa.string(), "canonical JSON of the settings that change the numbers"),
    ("eval_settings_hash", pa.string(), "sha256 of eval_settings"),
    ("code_version", pa.string(), "cloob version + git commit"),
    ("device", pa.string(), "cpu | cuda:<name>"),
    ("seconds", pa.float64(), "wall time of the evaluation"),
    ("started_at", _TS, "UTC"),
    ("finished_at", _TS, "UTC"),
    ("row_uuid", pa.string(), "unique id of this row (a re-evaluation writes a new row; the newest wins)"),
]

SCHEMA = pa.schema([pa.field(name, typ, metadata={"doc": doc}) for name, typ, doc in COLUMNS])
NAMES = [c[0] for c in COLUMNS]
