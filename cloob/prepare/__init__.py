"""Preparing pretraining data: a spec's (url, caption) rows -> img2dataset -> webdataset shards + manifest.

    spec.py          pretraining dataset specs (sources, img2dataset settings), validated, their hash
    sources.py       a spec's source rows: CC3M's TSV, a url/caption table, the demo's generated rows
    yfcc.py          YFCC15M: OpenAI's subset joined with YFCC100M's metadata, and the caption rule
    yfcc_metadata.py the metadata's three forms (25-column file, the original ten 23-column parts, the
                     Multimedia Commons SQLite database): which one an input is, reading it in batches
    rowsort.py       the rows in row-id order, and their digest
    identity.py      a row's identity across re-exports, and the identities given row ids so far
    matching.py      the re-read source matched against the known rows in partitions on local disk
    purge.py         removed rows' samples deleted from the shards for good (--purge-removed)
    run.py           prepare(): the whole preparation, resumable (`cloob prepare`)
    summary.py       what `cloob prepare` prints at the end, from the manifest
    stop.py          SIGTERM to `cloob prepare`: the download and every process of it stopped, one line
    folder.py        what a dataset folder may hold before preparation writes into it; staged writes
    manifest.py      the dataset manifest: shards, counts, digests, content hash
    versions.py      later versions: the source read again, only new rows fetched, removed rows left
                     out; versions(), resolve() and source_unchanged() for the pipeline
    distributors.py  img2dataset's pyspark and ray distributors: checks, sessions
    demo_server.py   the demo's image server on 127.0.0.1
    download/        one download round (rounds.py): img2dataset in its own process (fetch.py) with
                     the download guards it lacks (guards.py), and how Spark/Ray workers rebuild
                     them (unpickle.py)

cloob.data keeps only what reads shards (training and evaluation).
"""
