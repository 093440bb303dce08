"""Zero-shot evaluation: classification, retrieval and embedding diagnostics of image-text models.

    models.py       load a checkpoint of ours or open_clip weights from a file, with its lineage
    sets/           the evaluation sets: specs, reading them in the layouts users have, preparing them
    datasets.py     eval sets: class folders or webdataset shards, local or any fsspec URL
    zeroshot.py     the zero-shot classifier (cached per checkpoint x dataset) and its metrics
    retrieval.py    image<->text recall@k on captioned pairs
    diagnostics.py  effective eigenvalues, alignment/uniformity, the Ajne/Prentice statistic
    runner.py       one (checkpoint, dataset) evaluation -> one results-table row: settings, zero-shot, retrieval
    pairs.py        which pairs to evaluate, the rows already there (resume), and the loop over many
    claim.py        one evaluation of a (checkpoint, dataset, settings) pair at a time: its lock
    targets.py      what to evaluate, by the names people use: prepared sets by name (or `all`),
                    checkpoints by path, URL, registry alias or entry id
"""
