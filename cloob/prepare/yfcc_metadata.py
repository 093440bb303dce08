"""The YFCC100M metadata in the three forms it is published in: which form an input is (from its
first bytes), all of a job's inputs in reading order, each read in batches of (records, photo ids),
and a record's fields. The forms, their columns and sources are in cloob/prepare/yfcc.py's docstring.
Also the chunked line reader the subset list shares."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import fsspec
import numpy as np
from fsspec.utils import infer_compression, infer_storage_options

from cloob.errors import CloobError
from cloob.safetext import safe_text

log = logging.getLogger("cloob.prepare.yfcc")

N_COLUMNS = 25
COL_LINE, COL_ID, COL_HASH, COL_TITLE, COL_DESC, COL_URL, COL_MARKER = 0, 1, 2, 8, 9, 16, 24

SQLITE_TABLE = "yfcc100m_dataset"
SQLITE_COLUMNS = ("photoid", "title", "description", "downloadurl", "marker")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_PART = re.compile(r"^yfcc100m_dataset-(\d)(?:\.[A-Za-z0-9]+)*$")


@dataclass(frozen=True)
class _Layout:
    """Where the fields are in a tab-separated form."""

    name: str
    columns: int
    id: int
    title: int
    desc: int
    url: int
    marker: int
    line: int | None  # the line number column (form 3 only)
    hash: int | None


TSV25 = _Layout("the single 25-column file", 25, COL_ID, COL_TITLE, COL_DESC, COL_URL, COL_MARKER, COL_LINE,
                COL_HASH)
TSV23 = _Layout("the original 23-column release", 23, 0, 6, 7, 14, 22, None, None)
SQLITE = "the Multimedia Commons SQLite database"

FORMS = ("the Multimedia Commons SQLite database yfcc100m_dataset.sql (a local file), the original release's "
         "ten files yfcc100m_dataset-0..9(.bz2) with 23 tab-separated columns (pass each with --input), or "
         "the single yfcc100m_dataset(.bz2) with 25 (line number, photo id, hash, ...)")
METADATA_FIX = (f"pass one of: {FORMS}; see https://multimediacommons.wordpress.com/yfcc100m-core-dataset/")

_CHUNK_BYTES = 4 << 20
_SNIFF_BYTES = 1 << 20
_MAX_LINE_BYTES = 64 << 20  # a "line" this long means the file is not a text TSV
_LAYOUT_PROBE_LINES = 1000
MALFORMED, _BLANK = -1, -2  # sentinel photo ids; real ids are positive


def open_input(uri: str, what: str, fix: str) -> IO[bytes]:
    """Open `uri` for binary reading (compression inferred), or raise a CloobError."""
    try:
        return fsspec.open(uri, "rb", compression="infer").open()
    except FileNotFoundError:
        raise CloobError(f"{what} {safe_text(repr(uri))} not found", fix) from None
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many types: OSError, ClientError, ...)
        raise CloobError(f"cannot open {what} {safe_text(repr(uri))}: {type(e).__name__}: {safe_text(e)}",
                         fix) from None


def _read(f: IO[bytes], n: int, uri: str, what: str) -> bytes:
    try:
        return f.read(n)
    except (OSError, EOFError, ValueError) as e:  # truncated or corrupt compressed data, network
        raise CloobError(f"cannot read {what} {safe_text(repr(uri))}: {type(e).__name__}: {safe_text(e)}",
                         "check that the file is complete (re-download it) and readable") from None


def _iter_line_batches(f: IO[bytes], batch_lines: int, uri: str, what: str) -> Iterator[list[bytes]]:
    """Lists of about `batch_lines` lines (newline removed) read in fixed-size chunks.

    Chunked reads instead of readline: fsspec's remote files implement readline by reading a whole
    block per line, which is slow for 100M lines.
    """
    rest = b""
    batch: list[bytes] = []
    while True:
        chunk = _read(f, _CHUNK_BYTES, uri, what)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > _MAX_LINE_BYTES:
            raise CloobError(f"{what} {safe_text(repr(uri))} has a line longer than {_MAX_LINE_BYTES >> 20} MB; "
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


def first_line(uri: str, what: str, fix: str) -> bytes:
    with open_input(uri, what, fix) as f:
        for batch in _iter_line_batches(f, 1, uri, what):
            return batch[0]
    return b""


# -- which form the metadata is in ---------------------------------------------------------------------

@dataclass(frozen=True)
class Input:
    uri: str
    form: _Layout | str  # TSV25, TSV23 or SQLITE
    path: str | None = None  # the local path (SQLite)


def _part_number(uri: str) -> int | None:
    m = _PART.match(os.path.basename(uri.split("?", 1)[0].rstrip("/")))
    return int(m.group(1)) if m else None


def _pid(line: bytes, layout: _Layout) -> int:
    """Photo id of a metadata line, MALFORMED (not the layout's columns / bad id) or _BLANK."""
    if line.count(b"\t") != layout.columns - 1:
        return _BLANK if not line.strip() else MALFORMED
    start = 0
    for _ in range(layout.id):
        start = line.find(b"\t", start) + 1
    try:
        return int(line[start:line.find(b"\t", start)])
    except ValueError:
        return MALFORMED


def _pid25(line: bytes) -> int:  # _pid for TSV25, inlined: it runs 100M times
    if line.count(b"\t") != 24:
        return _BLANK if not line.strip() else MALFORMED
    i = line.find(b"\t")
    try:
        return int(line[i + 1:line.find(b"\t", i + 1)])
    except ValueError:
        return MALFORMED


def _pid23(line: bytes) -> int:  # _pid for TSV23
    if line.count(b"\t") != 22:
        return _BLANK if not line.strip() else MALFORMED
    try:
        return int(line[:line.find(b"\t")])
    except ValueError:
        return MALFORMED


_PID = {TSV25.name: _pid25, TSV23.name: _pid23}


def _sniff(uri: str) -> Input:
    """The form of one metadata input, from its first bytes; a CloobError naming the forms if none fits."""
    what = "YFCC100M metadata"
    with open_input(uri, what, "check the path or URL (for s3://: the bucket, the credentials, AWS_ENDPOINT_URL); "
               f"the metadata is one of: {FORMS}") as f:
        head = _read(f, _SNIFF_BYTES, uri, what)
    shown = safe_text(repr(uri))
    if head.startswith(_SQLITE_MAGIC):
        if infer_compression(uri):
            raise CloobError(f"{shown} is a compressed SQLite database; SQLite reads only an uncompressed file",
                             "decompress it first (e.g. bunzip2 -k, gunzip -k) and pass the .sql file")
        opts = infer_storage_options(uri)
        if opts.get("protocol") not in ("file", "local"):
            raise CloobError(f"{shown} is a SQLite database on remote storage; SQLite reads only local files",
                             f"download it first (e.g. aws s3 cp {uri} . , or curl -O for an https:// address) "
                             "and pass the local file")
        inp = Input(uri, SQLITE, opts["path"])
        _sqlite_connect(inp).close()  # its table and columns checked now, before any row is read
        return inp
    if not head:
        raise CloobError(f"the YFCC100M metadata file {shown} is empty", METADATA_FIX)
    lines = head.split(b"\n")
    if len(lines) > 1:
        lines.pop()  # cut mid-line
    probe = [ln.rstrip(b"\r") for ln in lines if ln.strip()][:_LAYOUT_PROBE_LINES]
    votes = {layout.name: sum(_pid(ln, layout) >= 0 for ln in probe) for layout in (TSV25, TSV23)}
    best = max((TSV25, TSV23), key=lambda layout: votes[layout.name])
    if votes[best.name] == 0:
        got = probe[0].count(b"\t") + 1 if probe else 0
        hint = " (that is the subset list's layout: the two files may be swapped)" if got == 3 else ""
        raise CloobError(f"{shown} is none of the YFCC100M metadata forms: expected {TSV25.columns} or "
                         f"{TSV23.columns} tab-separated columns with an integer photo id (or a SQLite "
                         f"database), got {got} columns{hint}", METADATA_FIX)
    return Input(uri, best)


def resolve_inputs(metadata: str | Sequence[str]) -> list[Input]:
    """The inputs in reading order, all of one form, or a CloobError saying what is wrong and the fix."""
    uris = [metadata] if isinstance(metadata, str) else list(metadata)
    if not uris:
        raise CloobError("no YFCC100M metadata given", METADATA_FIX)
    if len(set(uris)) != len(uris):
        raise CloobError("the same YFCC100M metadata file is given twice", "pass each file once")
    inputs = [_sniff(u) for u in uris]
    forms = {i.form if isinstance(i.form, str) else i.form.name for i in inputs}
    if len(forms) > 1:
        listing = "; ".join(f"{safe_text(repr(i.uri))}: {i.form if isinstance(i.form, str) else i.form.name}"
                            for i in inputs)
        raise CloobError(f"the YFCC100M metadata inputs are of different forms ({listing})",
                         "pass one form only: the SQLite database alone, the ten 23-column parts, or the "
                         "25-column file")
    form = inputs[0].form
    if form == SQLITE and len(inputs) > 1:
        raise CloobError("several SQLite databases given; the Multimedia Commons database holds all of YFCC100M",
                         "pass yfcc100m_dataset.sql alone")
    if form is TSV23 and len(inputs) > 1:
        numbers = [_part_number(i.uri) for i in inputs]
        if all(n is not None for n in numbers):
            doubles = sorted({n for n in numbers if numbers.count(n) > 1})
            if doubles:
                raise CloobError(f"part {', '.join(map(str, doubles))} of the original release is given more "
                                 "than once (e.g. as .bz2 and as plain text)", "pass each of the ten parts once")
            inputs = [i for _, i in sorted(zip(numbers, inputs), key=lambda t: t[0])]
            missing = sorted(set(range(10)) - set(numbers))
            if missing:
                log.warning("YFCC100M original release: parts %s are not given; their photos are left out",
                            ", ".join(map(str, missing)))
    return inputs


# -- reading each form in batches of (records, photo ids) ------------------------------------------------

def text_batches(inp: Input, batch_lines: int) -> Iterator[tuple[list, np.ndarray]]:
    pid = _PID[inp.form.name]
    with open_input(inp.uri, "YFCC100M metadata file", METADATA_FIX) as f:
        for lines in _iter_line_batches(f, batch_lines, inp.uri, "YFCC100M metadata file"):
            yield lines, np.fromiter(map(pid, lines), dtype=np.int64, count=len(lines))


def _sql_int(v) -> int:
    if isinstance(v, int):
        return v if v > 0 else MALFORMED
    try:
        n = int(v)  # TEXT comes as bytes (text_factory below); int() takes bytes of digits
    except (TypeError, ValueError):
        return MALFORMED
    return n if n > 0 else MALFORMED


def _sqlite_connect(inp: Input) -> sqlite3.Connection:
    shown = safe_text(repr(inp.uri))
    fix = f"pass the Multimedia Commons yfcc100m_dataset.sql, complete and uncompressed; or {FORMS}"
    try:
        from pathlib import Path

        con = sqlite3.connect(f"{Path(inp.path or inp.uri).resolve().as_uri()}?mode=ro", uri=True)
        con.text_factory = bytes  # decoded only for the rows kept; a stray byte cannot stop the scan
        tables = [r[0].decode() for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
        if SQLITE_TABLE not in tables:
            raise CloobError(f"the SQLite database {shown} has no table {SQLITE_TABLE!r} (it has: "
                             f"{safe_text(', '.join(tables) or 'no tables')})", fix)
        have = {r[1].decode() if isinstance(r[1], bytes) else r[1]
                for r in con.execute(f"PRAGMA table_info({SQLITE_TABLE})")}
        missing = [c for c in SQLITE_COLUMNS if c not in have]
        if missing:
            raise CloobError(f"the table {SQLITE_TABLE!r} of {shown} has no column(s) {', '.join(missing)} (it has: "
                             f"{safe_text(', '.join(sorted(have)))})", fix)
    except sqlite3.Error as e:
        raise CloobError(f"cannot read the SQLite database {shown}: {type(e).__name__}: {safe_text(e)}", fix) from None
    return con


def sqlite_batches(inp: Input, batch_lines: int) -> Iterator[tuple[list, np.ndarray]]:
    con = _sqlite_connect(inp)
    try:
        cur = con.execute(f"SELECT {', '.join(SQLITE_COLUMNS)} FROM {SQLITE_TABLE}")  # table order, streamed
        while True:
            try:
                rows = cur.fetchmany(batch_lines)
            except sqlite3.Error as e:
                raise CloobError(f"cannot read the SQLite database {safe_text(repr(inp.uri))}: {type(e).__name__}: "
                                 f"{safe_text(e)}", "check that the file is complete (download it again)") from None
            if not rows:
                return
            yield rows, np.fromiter((_sql_int(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    finally:
        con.close()


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def fields(record, form: _Layout | str) -> tuple[str, str, str, str, str | None, str | None]:
    """(title, description, url, marker, line, hash) of one record (raw text, not cleaned)."""
    if form == SQLITE:
        _, title, desc, url, marker = record
        return _text(title), _text(desc), _text(url), _text(marker), None, None
    cols = record.rstrip(b"\r").decode("utf-8", "replace").split("\t")
    return (cols[form.title], cols[form.desc], cols[form.url], cols[form.marker],
            cols[form.line] if form.line is not None else None, cols[form.hash] if form.hash is not None else None)
