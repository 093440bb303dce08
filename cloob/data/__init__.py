"""Reading webdataset shards in img2dataset's layout, from any fsspec URL: training and evaluation.

    shards.py     a dataset's shards and sample counts (img2dataset's NNNNN_stats.json)
    stream.py     the endless, deterministic, resumable stream of (image, tokens) batches
    remote.py     shard reads from a bucket that reopen a dropped connection at the byte where it broke
    tensor_transform.py  data.decoder=torchvision: open_clip's train crop on decode_jpeg's tensors (half the CPU)
    workers.py    DataLoader worker processes: how they start, what a forked one must not inherit
    synthetic.py  generated image-caption pairs in img2dataset's layout (the demo, tests, benchmarks)

Preparing data lives in cloob.prepare; the evaluation sets in cloob.evaluate.sets.
"""
