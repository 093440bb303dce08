"""YFCC15M: OpenAI's CLIP subset of YFCC100M, joined on photo id with the YFCC100M metadata.

OpenAI publishes only (line number, photo id, photo hash) for the 14,829,396 photos of the subset
(`yfcc100m_subset_data.tsv.bz2`). URLs and captions come from the YFCC100M metadata, which exists in
three forms; each is read as a stream, in bounded memory (the sorted subset ids and their line
numbers, ~240 MB for 15M photos, plus one batch of records):

1. The Multimedia Commons SQLite database `yfcc100m_dataset.sql` (s3://multimedia-commons/tools/etc/,
   the copy the spec's description points to). One table, `yfcc100m_dataset`, with 23 columns:
   photoid, uid, unickname, datetaken, dateuploaded, capturedevice, title, description, usertags,
   machinetags, longitude, latitude, accuracy, pageurl, downloadurl, licensename, licenseurl,
   serverid, farmid, secret, secretoriginal, ext, marker. No line number and no photo hash column;
   title and description are URL-encoded as in the text forms. Read with Python's sqlite3, read-only,
   rows streamed from a cursor (fetchmany). SQLite needs random access to a local file: a remote URL
   (s3://, https://) or a compressed copy is refused with the fix (download it / decompress it first).
2. The original Yahoo Webscope release: ten bzip2 files `yfcc100m_dataset-0.bz2` .. `-9.bz2`, each of
   10M lines of 23 tab-separated fields, the same fields in the same order as the SQLite columns
   (0 photo id, 6 title, 7 description, 14 download URL, 22 marker; no line number, no hash). Pass
   them as several --input, in any order (plain or .bz2 alike): they are read in their numbered order.
3. The single file `yfcc100m_dataset(.bz2)`: 25 tab-separated columns, the 23 above with a 0-based
   line number in front and the photo hash after the photo id (0 line, 1 photo id, 2 hash, 8 title,
   9 description, 16 download URL, 24 marker).

Line numbers. OpenAI's subset list gives "(line number, photo identifier, photo hash) ... the first
three columns in the dataset's metadata TSV file", i.e. columns 0-2 of form 3, whose line number
starts at 0. Forms 1 and 2 carry no line number, and no source found here says how form 3's line
numbers follow from the ten files (whether line = 10,000,000 x part + position, or in which order
the SQLite table holds its rows). So cloob never derives a line number from a row's position: every
form takes the photo's line number from the subset list itself (its own published number, joined on
photo id). In form 3 the file's column 0 is compared with it; a difference is counted (line_mismatch)
and the subset's number kept. A row's id is thus the same whichever form it came from, and since
`cloob prepare` writes the rows in row-id order (cloob.prepare.rowsort), the same photos give the same
dataset hash from every form. A subset given as a bare id array (no line numbers) works with form 3
only; the other forms refuse it.

Sources (read for facts, no code taken): openai/CLIP data/yfcc100m.md (the subset list's columns);
github.com/abhimanyudubey/GeoYFCC/issues/1 (the line number "begins from 0");
github.com/google-research/noisy-fewshot-learning/issues/1 (the 25 fields of yfcc100m_dataset);
the Yahoo Webscope YFCC100M ReadMe, as copied into public repositories ("ten bzip2-compressed files
(yfcc100m_dataset-0.bz2 to yfcc100m_dataset-9.bz2), each holding 10M lines" and its 23 fields);
readers of the ten parts: ymt123/attalos (23 META_FIELDS), plsang/yfcc100m (parts 0..9, marker last);
github.com/ml-jku/cloob/issues/14 (`.tables` -> yfcc100m_dataset in the Multimedia Commons file);
Joachim Folz's `yfcc100m` package (gitlab.com/jfolz/yfcc100m, fork zc277584121/yfcc100m:
AWS key tools/etc/yfcc100m_dataset.sql, table yfcc100m_dataset, columns downloadurl, longitude, ...);
github.com/yukimasano/PASS/issues/4 (the table's header row, quoted above, and "no column which
contains a 124 bit hash"); NVlabs/GroupViT convert_dataset/create_subset.py (joins the subset to that
table on photoid).

Caption rule. OpenAI built the subset by keeping photos whose title and/or description is natural
English text, so the caption has to come from those two fields (user tags and machine tags were not
part of the filter and are mostly keyword lists). Titles are short and often generic ("IMG_1234" was
filtered out, but "Paris" was not); descriptions add context but can be long. The default,
"title_description", uses both:

- "title": the cleaned title.
- "description": the cleaned description.
- "title_description" (default): title and description joined with ". " when both are non-empty
  and differ (with a plain " " when the title already ends in . ! ? : or ;); only one of them when
  the other is empty or they are equal.
- "longest": the longer of the cleaned title and description (the title on a tie).

Cleaning (`clean_text`): URL decoding ('+' is a space), HTML tags removed, HTML entities decoded,
whitespace collapsed. Rows whose caption is empty after cleaning are skipped and counted, as are
videos (marker != 0), rows without a download URL, malformed rows (not the form's column count, or
a non-integer photo id) and a photo id met again (only its first row counts). CLIP's tokenizer
truncates long captions at 77 tokens, so long descriptions are kept whole here.

Speed: Python's bz2 decompresses at a few tens of MB/s on one core; the metadata file is ~50 GB
uncompressed, so decompressing it once with a parallel tool (lbzip2, pbzip2) and passing the plain
file is much faster than passing the .bz2.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import unquote_plus

import numpy as np

from cloob.errors import CloobError
from cloob.prepare.yfcc_metadata import (
    MALFORMED,
    METADATA_FIX,
    SQLITE,
    TSV23,
    TSV25,
    Input,
    fields,
    first_line,
    open_input,
    resolve_inputs,
    sqlite_batches,
    text_batches,
)
from cloob.safetext import safe_text

log = logging.getLogger(__name__)

CaptionRule = Literal["title", "description", "title_description", "longest"]
CAPTION_RULES: tuple[str, ...] = get_args(CaptionRule)

# lines_read: records read (lines; rows of the SQLite table); matched: well-formed records whose
# photo id is in the subset (first time met); yielded: rows produced; skipped_*: matched rows dropped
# (video, no download URL, empty caption); malformed: records without the form's columns or with a
# non-integer photo id / line number; duplicates: records of a photo id already met; line_mismatch:
# form 3 rows whose column 0 differs from the subset's line number; subset_ids: size of the subset.
STAT_KEYS = ("lines_read", "matched", "yielded", "skipped_video", "skipped_no_url",
             "skipped_empty_caption", "malformed", "duplicates", "line_mismatch", "subset_ids")

SUBSET_URL = "https://openaipublic.azureedge.net/clip/data/yfcc100m_subset_data.tsv.bz2"
SUBSET_FIX = f"pass OpenAI's subset list yfcc100m_subset_data.tsv(.bz2) from {SUBSET_URL}"

# Block-level tags separate words; inline tags (a, b, i, span, ...) sit inside them.
_BLOCK_TAG = re.compile(
    r"</?(?:br|p|div|li|ul|ol|tr|td|th|h[1-6]|hr|blockquote|pre|table)\b[^<>]*>", re.IGNORECASE)
# Only '<' followed by a letter, '/' or '!' opens a tag, so text such as "i <3 it" or "a < b" survives.
_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>|<![^<>]*>", re.DOTALL)


def clean_text(s: str) -> str:
    """URL-decode ('+' = space), strip HTML tags, decode HTML entities, collapse whitespace.

    Tags are removed before entities are decoded so that escaped text ("&lt;3") stays text.
    Malformed percent escapes are kept as they are and invalid UTF-8 sequences are dropped.
    """
    if not s:
        return ""
    s = unquote_plus(s, errors="replace").replace("\ufffd", "")
    if "<" in s:
        s = _TAG.sub("", _BLOCK_TAG.sub(" ", s))
    if "&" in s:
        s = html.unescape(s)
    return " ".join(s.split())  # str.split() also splits on \xa0 (&nbsp;) and other Unicode spaces


def make_caption(title: str, description: str, rule: CaptionRule = "title_description") -> str:
    """Combine an already cleaned title and description by `rule` (see the module docstring)."""
    if rule == "title":
        return title
    if rule == "description":
        return description
    if rule == "longest":
        return description if len(description) > len(title) else title
    if rule == "title_description":
        if not title or not description or title == description:
            return title or description
        sep = " " if title[-1] in ".!?:;" else ". "
        return f"{title}{sep}{description}"
    raise CloobError(f"unknown caption rule {rule!r}", f"use one of {', '.join(CAPTION_RULES)}")


# -- the subset list -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subset:
    """The subset's photo ids (sorted, unique, int64) and, aligned with them, their line numbers in
    the 25-column metadata file (None when only ids are known)."""

    ids: np.ndarray
    lines: np.ndarray | None = None


def load_subset(uri: str) -> Subset:
    """The subset list (line, photo id, photo hash; tab-separated) as sorted unique ids with their
    line numbers (a photo listed twice keeps its first line).

    A first line whose photo id is not an integer is taken as a header and skipped. The file is
    parsed in blocks by pyarrow's streaming CSV reader, keeping only the line and photo id columns.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    what = "YFCC15M subset list"
    head = first_line(uri, what, SUBSET_FIX)
    if not head.strip():
        raise CloobError(f"the YFCC15M subset list {safe_text(repr(uri))} is empty (or starts with a blank line)",
                         SUBSET_FIX)
    first = head.rstrip(b"\r").split(b"\t")
    if len(first) < 2:
        raise CloobError(f"{safe_text(repr(uri))} does not look like the YFCC15M subset list: expected 3 "
                         f"tab-separated columns (line, photo id, photo hash), got {len(first)}", SUBSET_FIX)
    if len(first) in (TSV25.columns, TSV23.columns):
        raise CloobError(f"{safe_text(repr(uri))} looks like the YFCC100M metadata file, not the YFCC15M subset list",
                         f"{SUBSET_FIX} as the subset and the metadata file as the metadata")
    skip = 0 if first[1].strip().isdigit() else 1

    read = pacsv.ReadOptions(autogenerate_column_names=True, skip_rows=skip, block_size=8 << 20)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False)
    convert = pacsv.ConvertOptions(include_columns=["f0", "f1"], column_types={"f0": pa.int64(), "f1": pa.int64()})
    id_chunks: list[np.ndarray] = []
    line_chunks: list[np.ndarray] = []
    with open_input(uri, what, SUBSET_FIX) as f:
        try:
            for batch in pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert):
                for col, name in ((batch.column(1), "photo id"), (batch.column(0), "line number")):
                    if col.null_count:
                        raise CloobError(f"{safe_text(repr(uri))}: {col.null_count} rows have an empty {name}",
                                         SUBSET_FIX)
                id_chunks.append(np.array(batch.column(1).to_numpy(zero_copy_only=False), dtype=np.int64, copy=True))
                line_chunks.append(np.array(batch.column(0).to_numpy(zero_copy_only=False), dtype=np.int64, copy=True))
        except CloobError:
            raise
        except Exception as e:  # noqa: BLE001 (pyarrow: ArrowInvalid on bad rows, OSError on bad streams)
            # pyarrow quotes the offending line: the file's bytes, control characters and all.
            raise CloobError(f"cannot parse the YFCC15M subset list {safe_text(repr(uri))}: {type(e).__name__}: "
                             f"{safe_text(e)}", SUBSET_FIX) from None
    ids = np.concatenate(id_chunks) if id_chunks else np.empty(0, np.int64)
    lines = np.concatenate(line_chunks) if line_chunks else np.empty(0, np.int64)
    del id_chunks, line_chunks
    if ids.size == 0:
        raise CloobError(f"the YFCC15M subset list {safe_text(repr(uri))} has no rows", SUBSET_FIX)
    order = np.argsort(ids, kind="stable")  # stable: a photo listed twice keeps its first line
    ids, lines = ids[order], lines[order]
    del order
    if lines.size and 0 <= lines.min() and lines.max() < 2**31:
        lines = lines.astype(np.int32)  # line numbers < 100M: half the memory
    keep = np.empty(ids.size, dtype=bool)
    keep[0] = True
    np.not_equal(ids[1:], ids[:-1], out=keep[1:])
    return Subset(ids, lines) if keep.all() else Subset(ids[keep], lines[keep])


def load_subset_ids(uri: str) -> np.ndarray:
    """Sorted unique photo ids (int64) of the subset list (see load_subset)."""
    return load_subset(uri).ids


def _as_subset(subset: str | np.ndarray | Subset) -> Subset:
    if isinstance(subset, Subset):
        return subset
    if isinstance(subset, str):
        return load_subset(subset)
    ids = np.asarray(subset, dtype=np.int64)
    if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
        ids = np.unique(ids)  # searchsorted needs sorted ids; unique: one row per photo
    return Subset(ids)


# -- the join --------------------------------------------------------------------------------------------

def iter_yfcc_rows(subset_uri: str | np.ndarray | Subset, metadata_uri: str | Sequence[str],
                   caption_rule: CaptionRule = "title_description", *, batch_lines: int = 200_000,
                   progress: bool = False, stats: MutableMapping[str, int] | None = None) -> Iterator[dict]:
    """Stream the subset's photos from the metadata (any of its three forms; several inputs for the
    original release's parts), in the order the metadata holds them.

    Yields {"url", "caption", "photo_id", "line", "photo_hash"} per usable photo ("line": the subset's
    line number; "photo_hash": None where the form has none). `subset_uri` is the subset list's URI,
    a Subset, or a bare id array (form 3 only: the line numbers then come from its column 0). `stats`,
    if given, receives the counters in STAT_KEYS, updated as the stream goes (also when it is not
    consumed to the end). Raises CloobError at once for a bad caption rule, a missing file or inputs
    in no known form (or mixed forms).
    """
    if caption_rule not in CAPTION_RULES:
        raise CloobError(f"unknown caption rule {caption_rule!r}", f"use one of {', '.join(CAPTION_RULES)}")
    if batch_lines < 1:
        raise ValueError("batch_lines must be >= 1")
    subset = _as_subset(subset_uri)
    if subset.ids.size == 0:
        raise CloobError("the YFCC15M subset is empty", SUBSET_FIX)
    inputs = resolve_inputs(metadata_uri)  # every input opened now: errors surface early
    if subset.lines is None and inputs[0].form is not TSV25:
        form = inputs[0].form if isinstance(inputs[0].form, str) else inputs[0].form.name
        raise CloobError(f"{form} has no line numbers, and the subset was given without them",
                         f"{SUBSET_FIX} (it holds each photo's line number)")
    return _join(subset, inputs, caption_rule, batch_lines, progress, stats if stats is not None else {})


def _join(subset: Subset, inputs: list[Input], rule: CaptionRule, batch_lines: int, progress: bool,
          st: MutableMapping[str, int]) -> Iterator[dict]:
    for k in STAT_KEYS:
        st[k] = 0
    ids, sub_lines = subset.ids, subset.lines
    st["subset_ids"] = int(ids.size)
    taken = np.zeros(ids.size, dtype=bool)  # photos met already: one row per photo
    want_title = rule != "description"
    want_desc = rule != "title"
    form = inputs[0].form
    label = form if isinstance(form, str) else form.name
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="YFCC100M metadata", unit=" rows" if form == SQLITE else " lines", unit_scale=True,
                   mininterval=2.0)
    try:
        for inp in inputs:
            batches = sqlite_batches(inp, batch_lines) if form == SQLITE else text_batches(inp, batch_lines)
            empty = True
            for records, pids in batches:
                empty = False
                st["lines_read"] += len(records)
                st["malformed"] += int((pids == MALFORMED).sum())
                # Vectorised membership: position of each id in the sorted subset, then equality.
                pos = np.searchsorted(ids, pids)
                np.minimum(pos, ids.size - 1, out=pos)
                hits = np.flatnonzero((ids[pos] == pids) & (pids >= 0))
                for i in hits:
                    p = pos[i]
                    if taken[p]:
                        st["duplicates"] += 1
                        continue
                    taken[p] = True
                    st["matched"] += 1
                    title, desc, url, marker, file_line, photo_hash = fields(records[i], form)
                    if marker.strip() != "0":
                        st["skipped_video"] += 1
                        continue
                    url = url.strip()
                    if not url:
                        st["skipped_no_url"] += 1
                        continue
                    caption = make_caption(clean_text(title) if want_title else "",
                                           clean_text(desc) if want_desc else "", rule)
                    if not caption:
                        st["skipped_empty_caption"] += 1
                        continue
                    line = int(sub_lines[p]) if sub_lines is not None else None
                    if file_line is not None:
                        from_file = _int_or_none(file_line)
                        if from_file is None:
                            st["malformed"] += 1
                            continue
                        if line is None:
                            line = from_file
                        elif from_file != line:
                            st["line_mismatch"] += 1
                    st["yielded"] += 1
                    yield {"url": url, "caption": caption, "photo_id": int(pids[i]), "line": line,
                           "photo_hash": photo_hash.strip() if photo_hash is not None else None}
                if bar is not None:
                    bar.update(len(records))
                    bar.set_postfix(kept=st["yielded"], refresh=False)
            if empty:
                raise CloobError(f"the YFCC100M metadata {safe_text(repr(inp.uri))} is empty", METADATA_FIX)
        if st["matched"] == 0:
            log.warning("no photo of the YFCC15M subset (%d ids) was found in %s", ids.size,
                        ", ".join(i.uri for i in inputs))
        if st["line_mismatch"]:
            log.warning("%d rows of %s have another line number in column 0 than the subset list gives them; "
                        "the subset's is used (is the subset list from the same release?)", st["line_mismatch"],
                        inputs[0].uri)
        log.info("YFCC15M join (%s, %d input(s)): %s", label, len(inputs), dict(st))
    finally:
        if bar is not None:
            bar.close()


def _int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None
