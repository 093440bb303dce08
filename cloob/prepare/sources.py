"""Source rows for a pretraining spec: an iterator of {row_id, url, caption, source_key}.

`row_id` is the row's position in its source (the TSV line, the YFCC photo's line number as OpenAI's
subset list gives it, the table row, the demo index), so it stays the same however the validation
rules below change.
Rows with a URL that is not http(s) or an empty caption are dropped and counted, not fatal: real
lists hold some of both. A source in the wrong layout is fatal, with a message saying what was
expected. Text from the source (a column name, a parser's complaint quoting a line) goes into a
message only through cloob.safetext: a junk file must not write control bytes to the terminal.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import fsspec

from cloob.errors import CloobError
from cloob.prepare.spec import Cc3mSource, DemoSource, PretrainSpec, TableSource, Yfcc15mSource
from cloob.safetext import safe_text
from cloob.storage import protocol_of

_WS = re.compile(r"\s+")


def clean_caption(text: str | None) -> str:
    return _WS.sub(" ", text).strip() if text else ""


def valid_url(url: str | None) -> bool:
    return bool(url) and url.startswith(("http://", "https://")) and not any(c.isspace() for c in url.strip())


def _open_text(uri: str, what: str, fix: str):
    try:
        return fsspec.open(uri, "rt", compression="infer", encoding="utf-8", errors="replace").open()
    except FileNotFoundError:
        raise CloobError(f"{what} {safe_text(repr(uri))} does not exist", fix) from None
    except (OSError, ValueError) as e:
        raise CloobError(f"cannot open {what} {safe_text(repr(uri))}: {type(e).__name__}: {safe_text(e)}",
                         fix) from None


def _cc3m(src: Cc3mSource) -> Iterator[dict]:
    fix = f"download the CC3M TSV from {src.download_page} and pass --input <path to the .tsv>"
    if not src.path:
        raise CloobError("the cc3m spec needs Google's TSV (caption<TAB>url, no header)", fix)
    with _open_text(src.path, "CC3M TSV", fix) as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 2:
                if i < 3:
                    raise CloobError(f"{safe_text(src.path)}: line {i + 1} has {len(parts)} tab-separated fields, "
                                     "expected 2 (caption<TAB>url)", fix)
                yield {"row_id": i, "url": None, "caption": None, "source_key": f"line:{i + 1}"}
                continue
            caption, url = parts
            if i == 0 and valid_url(caption) and not valid_url(url):
                raise CloobError(f"{safe_text(src.path)}: the first line reads url<TAB>caption; CC3M's TSV is "
                                 "caption<TAB>url", "use a table spec (kind: table) for other layouts")
            yield {"row_id": i, "url": url.strip(), "caption": caption, "source_key": f"line:{i + 1}"}


def _table_files(src: TableSource, fix: str) -> list[str]:
    """The table's file, or the files a glob in its path names, in name order (daily dumps)."""
    if not any(ch in src.path for ch in "*?["):
        return [src.path]
    try:
        fs, _ = fsspec.core.url_to_fs(src.path)
        protocol = protocol_of(fs)
        fs.invalidate_cache()  # a listing cached earlier in this process would miss a new dump
        paths = sorted(fs.glob(src.path))
    except (OSError, ValueError) as e:
        raise CloobError(f"cannot list tables {safe_text(repr(src.path))}: {type(e).__name__}: {safe_text(e)}",
                         fix) from None
    if not paths:
        raise CloobError(f"no table matches {safe_text(repr(src.path))}", fix)
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths]


def _table(src: TableSource) -> Iterator[dict]:
    """The rows of a url/caption table, or of every table a glob names (in name order, numbered on
    across them). With source.key the row's key column goes into its source_key (`key:<value>`),
    which identifies it across re-exports (cloob.prepare.versions)."""
    fix = "pass --input <table with url and caption columns> (tsv, csv or parquet)"
    if not src.path:
        raise CloobError("the table spec names no file", fix)
    i = 0
    for path in _table_files(src, fix):
        for url, cap, key in _table_file(src, path, fix):
            yield {"row_id": i, "url": url.strip() if url else url, "caption": cap,
                   "source_key": f"row:{i}" if src.key is None else f"key:{'' if key is None else key}"}
            i += 1


def _table_file(src: TableSource, path: str, fix: str) -> Iterator[tuple]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fmt = src.format or next((f for f in ("parquet", "tsv", "csv") if path.split("?")[0]
                              .removesuffix(".gz").removesuffix(".bz2").endswith("." + f)), None)
    if fmt is None:
        raise CloobError(f"cannot tell the format of {safe_text(repr(path))} from its name", "set source.format")
    wanted = [c for c in (src.url_col, src.caption_col, src.key) if c is not None]
    try:
        f = fsspec.open(path, "rb", compression=None if fmt == "parquet" else "infer").open()
    except FileNotFoundError:
        raise CloobError(f"table {safe_text(repr(path))} does not exist", fix) from None
    with f:
        try:
            if fmt == "parquet":
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                batches = pf.iter_batches(batch_size=65536, columns=[c for c in wanted if c in names])
            else:
                reader = pcsv.open_csv(f, parse_options=pcsv.ParseOptions(
                    delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=False),
                    convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(wanted, pa_string())))
                names = reader.schema.names
                batches = reader
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types for bad files)
            # pyarrow quotes the offending line, which in a junk file is raw bytes
            raise CloobError(f"cannot read table {safe_text(repr(path))}: {safe_text(e)}", fix) from None
        missing = [c for c in wanted if c not in names]
        if missing:
            has = safe_text(", ".join(repr(n) for n in names), 300)
            raise CloobError(f"table {safe_text(repr(path))} has no column(s) {missing}; it has "
                             f"{len(names)}: {has}",
                             "set source.url_col / source.caption_col / source.key to the right names")
        for batch in batches:
            urls = batch.column(src.url_col).to_pylist()
            caps = batch.column(src.caption_col).to_pylist()
            keys = batch.column(src.key).to_pylist() if src.key is not None else [None] * len(urls)
            yield from zip(urls, caps, keys)


def pa_string():
    import pyarrow as pa

    return pa.string()


def _yfcc(src: Yfcc15mSource, progress: bool) -> Iterator[dict]:
    from cloob.prepare.yfcc import iter_yfcc_rows
    from cloob.prepare.yfcc_metadata import METADATA_FIX

    if not src.metadata:
        raise CloobError("the yfcc15m spec needs the YFCC100M metadata", f"--input: {METADATA_FIX}")
    for r in iter_yfcc_rows(src.subset, src.metadata, src.caption_rule, progress=progress):
        yield {"row_id": int(r["line"]), "url": r["url"], "caption": r["caption"],
               "source_key": f"photo:{r['photo_id']}"}


def _demo(src: DemoSource) -> Iterator[dict]:
    from cloob.prepare.demo_server import demo_rows

    for i, r in enumerate(demo_rows(src.seed, src.image_size, src.max_items, src.samples)):
        yield {"row_id": i, **r, "source_key": f"demo:{src.seed}:{i}"}


def iter_rows(spec: PretrainSpec, counts: Counter, progress: bool = False) -> Iterator[dict]:
    """The spec's usable rows (cleaned); `counts` receives read/kept/invalid_url/empty_caption."""
    src = spec.source
    if isinstance(src, Cc3mSource):
        rows = _cc3m(src)
    elif isinstance(src, TableSource):
        rows = _table(src)
    elif isinstance(src, Yfcc15mSource):
        rows = _yfcc(src, progress)
    else:
        rows = _demo(src)
    for row in rows:
        if spec.limit is not None and counts["read"] >= spec.limit:
            break
        counts["read"] += 1
        if not valid_url(row["url"]):
            counts["invalid_url"] += 1
            continue
        row["caption"] = clean_caption(row["caption"])
        if not row["caption"]:
            counts["empty_caption"] += 1
            continue
        counts["kept"] += 1
        yield row
