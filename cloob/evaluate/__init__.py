"""Zero-shot evaluation: classification, retrieval and embedding diagnostics of image-text models.

    models      load a checkpoint of ours or open_clip weights from a file, with its lineage
    sets        the evaluation sets: specs, reading them in the layouts users have, preparing them
    datasets    eval sets: class folders or webdataset shards, local or any fsspec URL
    zeroshot    the zero-shot classifier (cached per checkpoint x dataset) and its metrics
    retrieval   image<->text recall@k on captioned pairs
    diagnostics effective eigenvalues, alignment/uniformity, the Ajne/Prentice statistic
    runner      one (checkpoint, dataset) evaluation -> one results-table row
    claim       one evaluation of a (checkpoint, dataset, settings) pair at a time: its lock
"""
