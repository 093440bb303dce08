"""Zero-shot evaluation sets (data_specs/downstream/*.yaml): their specs, reading them in the layouts
users have them, and their preparation.

    spec.py      the spec (source, layouts, pairing, classes, templates, main metric, published test
                 size), loading, listing, its hash
    tree.py      a source's files, listed once (a local folder or any fsspec URL)
    reading.py   read_set: the source in the first of the spec's layouts it holds -> which images are in
                 the test split and their classes, how each class was paired, warnings
    folders.py   class folders: finding their root and split, pairing each by name / class id / wnid
                 (never by position), applying a split file
    labels.py    label files of the official distributions (GTSRB, Flowers102, Stanford Cars, ImageNet)
    build.py     a set's folder from its source: an archive (download, verify, extract), a folder the
                 user has, or generated images; publishing it under <out>/<name>/
    manifest.py  items.tsv and manifest.json (written last), reading them back
    prepare.py   prepare_downstream: the whole preparation of one set, skipped when its manifest matches
    archive.py   verified downloads and safe extraction

A folder without a manifest is unfinished; a manifest records the complete, checked pairing of every
class with per-class image counts. A rerun with the same spec and source finds it and does nothing.
`cloob evaluate --data` reads an unprepared folder with the same read_set.
"""
