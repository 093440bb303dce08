"""bench/bench_pipeline.py compares like with like: from the same shard, our training pipeline and
open_clip's webdataset pipeline give batches of the same shape, dtype and normalisation, each image
belonging to its own caption. Not timed."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_pipeline as bp  # noqa: E402

pytest.importorskip("open_clip_train.data")

N = 8


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(folder: Path) -> dict[str, np.ndarray]:
    """One shard of N photo-like pictures at 341x256 (img2dataset's keep_ratio at 256, 4:3); caption ->
    the picture's mean RGB in [0, 1]."""
    means = {}
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(N):
            buf = io.BytesIO()
            bp.photo(i, 341, 256).save(buf, "JPEG", quality=95)
            _add(tar, f"{i:09d}.jpg", buf.getvalue())
            _add(tar, f"{i:09d}.txt", bp.caption(i).encode())
            with Image.open(io.BytesIO(buf.getvalue())) as im:
                means[bp.caption(i)] = np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255
    return means


def test_both_pipelines_give_like_batches(tmp_path):
    means = _shard(tmp_path)
    tokenizer = open_clip.get_tokenizer(bp.ARCH)
    by_tokens = {tuple(tokenizer([c])[0].tolist()): m for c, m in means.items()}
    ours_image, ours_text = next(bp.ours(str(tmp_path), 0, 4, shuffle_buffer=N))
    peer_image, peer_text = next(bp.open_clip_pipeline(str(tmp_path), 0, 4))

    assert ours_image.shape == peer_image.shape == (4, 3, 224, 224)
    assert ours_image.dtype == peer_image.dtype == torch.float32
    assert ours_text.shape == peer_text.shape == (4, 77)
    assert ours_text.dtype == peer_text.dtype
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    for image, text in ((ours_image, ours_text), (peer_image, peer_text)):
        pixels = image * std + mean  # the same normalisation undone: back to [0, 1] (bicubic overshoots a little)
        assert pixels.min() > -0.1 and pixels.max() < 1.1
        for row, tokens in zip(pixels, text):
            # A crop covers at least 90% of its picture: its mean colour is the picture's.
            source = by_tokens[tuple(tokens.tolist())]
            assert np.abs(row.mean(dim=(1, 2)).double().numpy() - source).max() < 0.03


def test_same_transform_and_tokenizer():
    from cloob.model import create_model

    _, ours_tf, _, ours_tok = create_model(bp.ARCH)
    _, peer_tf, _ = open_clip.create_model_and_transforms(bp.ARCH)
    assert repr(ours_tf) == repr(peer_tf)
    text = [bp.caption(0), bp.caption(1)]
    assert torch.equal(ours_tok(text), open_clip.get_tokenizer(bp.ARCH)(text))
