"""YFCC15M: OpenAI's CLIP subset of YFCC100M, joined on photo id with the YFCC100M metadata file.

OpenAI publishes only (line number, photo id, photo hash) for the 14,829,396 photos of the subset
(`yfcc100m_subset_data.tsv.bz2`). URLs and captions come from the YFCC100M metadata file
(`yfcc100m_dataset(.bz2)`, 100M rows, 25 tab-separated columns, no header). Both are read through
fsspec (local, s3://, http(s)://; bz2/gz/plain inferred from the name) as streams, so memory stays
bounded: the sorted subset ids (an int64 array, ~120 MB for 15M ids) plus one batch of metadata lines.

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
videos (marker != 0), rows without a download URL and malformed rows (not 25 columns, or a
non-integer photo id). CLIP's tokenizer truncates long captions at 77 tokens, so long descriptions
are kept whole here.

Speed: Python's bz2 decompresses at a few tens of MB/s on one core; the metadata file is ~50 GB
uncompressed, so decompressing it once with a parallel tool (lbzip2, pbzip2) and passing the plain
file is much faster than passing the .bz2.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator, MutableMapping
from typing import IO, Literal, get_args
from urllib.parse import unquote_plus

import fsspec
import numpy as np

from cloob.errors import CloobError
from cloob.safetext import safe_text

log = logging.getLogger(__name__)

CaptionRule = Literal["title", "description", "title_description", "longest"]
CAPTION_RULES: tuple[str, ...] = get_args(CaptionRule)

N_COLUMNS = 25
COL_LINE, COL_ID, COL_HASH, COL_TITLE, COL_DESC, COL_URL, COL_MARKER = 0, 1, 2, 8, 9, 16, 24

# lines_read: all lines; matched: well-formed lines whose photo id is in the subset; yielded: rows
# produced; skipped_*: matched rows dropped (video, no download URL, empty caption); malformed: lines
# without 25 columns or with a non-integer photo id / line number; subset_ids: size of the subset.
STAT_KEYS = ("lines_read", "matched", "yielded", "skipped_video", "skipped_no_url",
             "skipped_empty_caption", "malformed", "subset_ids")

SUBSET_URL = "https://openaipublic.azureedge.net/clip/data/yfcc100m_subset_data.tsv.bz2"
METADATA_FIX = ("pass yfcc100m_dataset(.bz2) from the YFCC100M core dataset "
                "(https://multimediacommons.wordpress.com/yfcc100m-core-dataset/)")
SUBSET_FIX = f"pass OpenAI's subset list yfcc100m_subset_data.tsv(.bz2) from {SUBSET_URL}"

_CHUNK_BYTES = 4 << 20
_MAX_LINE_BYTES = 64 << 20  # a "line" this long means the file is not a text TSV
_LAYOUT_PROBE_LINES = 1000
_MALFORMED, _BLANK = -1, -2  # sentinel photo ids; real ids are positive

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


def _open(uri: str, what: str, fix: str) -> IO[bytes]:
    """Open `uri` for binary reading (compression inferred), or raise a CloobError."""
    try:
        return fsspec.open(uri, "rb", compression="infer").open()
    except FileNotFoundError:
        raise CloobError(f"{what} {uri!r} not found", fix) from None
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many types: OSError, ClientError, ...)
        raise CloobError(f"cannot open {what} {uri!r}: {type(e).__name__}: {safe_text(e)}", fix) from None


def _iter_line_batches(f: IO[bytes], batch_lines: int, uri: str, what: str) -> Iterator[list[bytes]]:
    """Lists of about `batch_lines` lines (newline removed) read in fixed-size chunks.

    Chunked reads instead of readline: fsspec's remote files implement readline by reading a whole
    block per line, which is slow for 100M lines.
    """
    rest = b""
    batch: list[bytes] = []
    while True:
        try:
            chunk = f.read(_CHUNK_BYTES)
        except (OSError, EOFError, ValueError) as e:  # truncated or corrupt compressed data, network
            raise CloobError(f"cannot read {what} {uri!r}: {type(e).__name__}: {safe_text(e)}",
                             "check that the file is complete (re-download it) and readable") from None
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > _MAX_LINE_BYTES:
            raise CloobError(f"{what} {uri!r} has a line longer than {_MAX_LINE_BYTES >> 20} MB; "
                             "it is not a text TSV",
                             "check the file (is it the right one, and fully decompressed?)")
        batch.extend(lines)
        if len(batch) >= batch_lines:
            yield batch
            batch = []
    if rest:
        batch.append(rest)
    if batch:
        yield batch


def _first_line(uri: str, what: str, fix: str) -> bytes:
    with _open(uri, what, fix) as f:
        for batch in _iter_line_batches(f, 1, uri, what):
            return batch[0]
    return b""


def load_subset_ids(uri: str) -> np.ndarray:
    """Sorted unique photo ids (int64) of the subset list (line, photo id, photo hash; tab-separated).

    A first line whose photo id is not an integer is taken as a header and skipped. The file is
    parsed in blocks by pyarrow's streaming CSV reader, keeping only the photo id column.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    what = "YFCC15M subset list"
    first_line = _first_line(uri, what, SUBSET_FIX)
    if not first_line.strip():
        raise CloobError(f"the YFCC15M subset list {uri!r} is empty (or starts with a blank line)",
                         SUBSET_FIX)
    first = first_line.rstrip(b"\r").split(b"\t")
    if len(first) < 2:
        raise CloobError(f"{uri!r} does not look like the YFCC15M subset list: expected 3 tab-separated "
                         f"columns (line, photo id, photo hash), got {len(first)}", SUBSET_FIX)
    if len(first) == N_COLUMNS:
        raise CloobError(f"{uri!r} looks like the YFCC100M metadata file, not the YFCC15M subset list",
                         f"{SUBSET_FIX} as the subset and the metadata file as the metadata")
    skip = 0 if first[1].strip().isdigit() else 1

    read = pacsv.ReadOptions(autogenerate_column_names=True, skip_rows=skip, block_size=8 << 20)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False)
    convert = pacsv.ConvertOptions(include_columns=["f1"], column_types={"f1": pa.int64()})
    chunks: list[np.ndarray] = []
    with _open(uri, what, SUBSET_FIX) as f:
        try:
            for batch in pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert):
                col = batch.column(0)
                if col.null_count:
                    raise CloobError(f"{uri!r}: {col.null_count} rows have an empty photo id", SUBSET_FIX)
                chunks.append(np.array(col.to_numpy(zero_copy_only=False), dtype=np.int64, copy=True))
        except CloobError:
            raise
        except Exception as e:  # noqa: BLE001 (pyarrow: ArrowInvalid on bad rows, OSError on bad streams)
            # pyarrow quotes the offending line: the file's bytes, control characters and all.
            raise CloobError(f"cannot parse the YFCC15M subset list {uri!r}: {type(e).__name__}: {safe_text(e)}",
                             SUBSET_FIX) from None
    ids = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
    del chunks
    if ids.size == 0:
        raise CloobError(f"the YFCC15M subset list {uri!r} has no rows", SUBSET_FIX)
    ids.sort()  # in place: no second 120 MB array, unlike np.unique
    keep = np.empty(ids.size, dtype=bool)
    keep[0] = True
    np.not_equal(ids[1:], ids[:-1], out=keep[1:])
    return ids if keep.all() else ids[keep]


def _photo_id(line: bytes) -> int:
    """Photo id of a metadata line, _MALFORMED (not 25 columns / bad id) or _BLANK."""
    if line.count(b"\t") != N_COLUMNS - 1:
        return _BLANK if not line.strip() else _MALFORMED
    i = line.find(b"\t")
    try:
        return int(line[i + 1:line.find(b"\t", i + 1)])
    except ValueError:
        return _MALFORMED


def iter_yfcc_rows(subset_uri: str | np.ndarray, metadata_uri: str,
                   caption_rule: CaptionRule = "title_description", *, batch_lines: int = 200_000,
                   progress: bool = False, stats: MutableMapping[str, int] | None = None) -> Iterator[dict]:
    """Stream the subset's photos from the metadata file, in file order.

    Yields {"url", "caption", "photo_id", "line", "photo_hash"} per usable photo. `subset_uri` is the
    subset list's URI or an array from `load_subset_ids`. `stats`, if given, receives the counters in
    STAT_KEYS, updated as the stream goes (also when it is not consumed to the end). Raises CloobError
    at once for a bad caption rule or a missing file, and on the first batch for a wrong layout.
    """
    if caption_rule not in CAPTION_RULES:
        raise CloobError(f"unknown caption rule {caption_rule!r}", f"use one of {', '.join(CAPTION_RULES)}")
    if batch_lines < 1:
        raise ValueError("batch_lines must be >= 1")
    if isinstance(subset_uri, str):
        ids = load_subset_ids(subset_uri)
    else:
        ids = np.asarray(subset_uri, dtype=np.int64)
        if ids.size > 1 and not (ids[1:] >= ids[:-1]).all():
            ids = np.sort(ids)  # searchsorted needs sorted ids
    if ids.size == 0:
        raise CloobError("the YFCC15M subset is empty", SUBSET_FIX)
    f = _open(metadata_uri, "YFCC100M metadata file", METADATA_FIX)  # opened now: errors surface early
    return _join(ids, f, metadata_uri, caption_rule, batch_lines, progress,
                 stats if stats is not None else {})


def _join(ids: np.ndarray, f: IO[bytes], uri: str, rule: CaptionRule, batch_lines: int, progress: bool,
          st: MutableMapping[str, int]) -> Iterator[dict]:
    for k in STAT_KEYS:
        st[k] = 0
    st["subset_ids"] = int(ids.size)
    want_title = rule != "description"
    want_desc = rule != "title"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="YFCC100M metadata", unit=" lines", unit_scale=True, mininterval=2.0)
    first = True
    try:
        with f:
            for lines in _iter_line_batches(f, batch_lines, uri, "YFCC100M metadata file"):
                pids = np.fromiter(map(_photo_id, lines), dtype=np.int64, count=len(lines))
                if first:
                    _check_layout(lines, pids, uri)
                    first = False
                st["lines_read"] += len(lines)
                st["malformed"] += int((pids == _MALFORMED).sum())
                # Vectorised membership: position of each id in the sorted subset, then equality.
                pos = np.searchsorted(ids, pids)
                np.minimum(pos, ids.size - 1, out=pos)
                hits = np.flatnonzero((ids[pos] == pids) & (pids >= 0))
                st["matched"] += int(hits.size)
                for i in hits:
                    cols = lines[i].rstrip(b"\r").decode("utf-8", "replace").split("\t")
                    if cols[COL_MARKER].strip() != "0":
                        st["skipped_video"] += 1
                        continue
                    url = cols[COL_URL].strip()
                    if not url:
                        st["skipped_no_url"] += 1
                        continue
                    caption = make_caption(clean_text(cols[COL_TITLE]) if want_title else "",
                                           clean_text(cols[COL_DESC]) if want_desc else "", rule)
                    if not caption:
                        st["skipped_empty_caption"] += 1
                        continue
                    line_no = _int_or_none(cols[COL_LINE])
                    if line_no is None:
                        st["malformed"] += 1
                        continue
                    st["yielded"] += 1
                    yield {"url": url, "caption": caption, "photo_id": int(pids[i]),
                           "line": line_no, "photo_hash": cols[COL_HASH].strip()}
                if bar is not None:
                    bar.update(len(lines))
                    bar.set_postfix(kept=st["yielded"], refresh=False)
        if first:
            raise CloobError(f"the YFCC100M metadata file {uri!r} is empty", METADATA_FIX)
        if st["matched"] == 0:
            log.warning("no photo of the YFCC15M subset (%d ids) was found in %s", ids.size, uri)
        log.info("YFCC15M join: %s", dict(st))
    finally:
        if bar is not None:
            bar.close()


def _check_layout(lines: list[bytes], pids: np.ndarray, uri: str) -> None:
    """Raise a CloobError if none of the first lines has the metadata file's layout."""
    probe = [i for i in range(min(len(lines), 10 * _LAYOUT_PROBE_LINES)) if pids[i] != _BLANK]
    probe = probe[:_LAYOUT_PROBE_LINES]
    if probe and not (pids[probe] >= 0).any():
        got = lines[probe[0]].count(b"\t") + 1
        hint = " (that is the subset list's layout: the two files may be swapped)" if got == 3 else ""
        raise CloobError(f"{uri!r} does not look like the YFCC100M metadata file: expected {N_COLUMNS} "
                         f"tab-separated columns with an integer photo id in the second, got {got}{hint}",
                         METADATA_FIX)


def _int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None
