"""Zero-shot evaluation sets (data_specs/downstream/*.yaml): their specs and their preparation.

    spec.py      the spec (source, layout, classes, templates, main metric), loading, listing, its hash
    folders.py   a source tree's class folders: finding their root, matching them to the spec's classes
    build.py     a set's folder from its source: an archive (download, verify, extract), generated
                 images, or a folder the user supplies; publishing it under <out>/<name>/
    manifest.py  manifest.json, written last: reading it, and where a prepared set's class folders are
    prepare.py   prepare_downstream: the whole preparation of one set, skipped when its manifest matches

A folder without a manifest is unfinished, and a manifest is the complete, checked class -> folder
pairing with per-class image counts. A rerun with the same spec and source finds the manifest and
does nothing.
"""
