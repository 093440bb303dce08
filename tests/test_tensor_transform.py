"""data.decoder=torchvision: open_clip's train transform run on tensors gives the same crops as the PIL path
(pixels equal up to rounding), in the stream too, for the picture formats shards really hold; what it cannot
run is refused with the fix; the default leaves every recipe hash as it was."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from cloob.config import Recipe, load_recipe
from cloob.data.stream import ShardStream
from cloob.data.tensor_transform import TensorTrainTransform
from cloob.errors import CloobError
from cloob.model import create_model

# One step of 255 after normalisation by open_clip's smallest std (0.2613). The PIL and torch resizes
# (both antialiased bicubic) round differently: on grainy pictures single pixels are up to ~5 steps apart,
# a fraction of a step on average; a crop box one pixel off is several steps apart on average.
STEP = 1 / 255 / 0.2613
MEAN_STEPS, MAX_STEPS = 0.5, 6.01


@pytest.fixture(scope="module")
def rn50_train_tf():
    return create_model("RN50")[1]


def photo(seed: int, w: int, h: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour fields plus grain: something with the detail of a photo, not flat shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + c) + seed) * np.cos(yy / (11 + c)) for c in range(3)], -1)
    arr = np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pil_path(data: bytes, tf, seed: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    torch.manual_seed(seed)
    return tf(img)


def tensor_path(data: bytes, ttf: TensorTrainTransform, seed: int) -> torch.Tensor:
    img = ttf.decode(data)
    torch.manual_seed(seed)
    return ttf(img)


CASES = {
    "jpeg 256 (img2dataset's output)": lambda: encoded(photo(1, 341, 256), "JPEG", quality=95),
    "jpeg 384 portrait": lambda: encoded(photo(2, 384, 512), "JPEG", quality=90),
    "grayscale jpeg": lambda: encoded(photo(3, 300, 256, "L"), "JPEG", quality=95),
    "cmyk jpeg (PIL decodes it)": lambda: encoded(photo(4, 256, 256, "CMYK"), "JPEG", quality=95),
    "png": lambda: encoded(photo(5, 256, 300), "PNG"),
    "palette png (PIL decodes it)": lambda: encoded(photo(6, 256, 256).convert("P"), "PNG"),
    "webp": lambda: encoded(photo(7, 320, 256), "WEBP", quality=90),
}


@pytest.mark.parametrize("case", CASES)
def test_the_tensor_path_gives_the_pil_paths_crop_up_to_rounding(case, rn50_train_tf):
    data = CASES[case]()
    ttf = TensorTrainTransform.of(rn50_train_tf)
    for seed in (0, 1, 2):
        want, got = pil_path(data, rn50_train_tf, seed), tensor_path(data, ttf, seed)
        assert got.shape == want.shape == (3, 224, 224) and got.dtype == want.dtype == torch.float32
        diff = (got - want).abs()
        assert diff.mean() < MEAN_STEPS * STEP and diff.max() <= MAX_STEPS * STEP, (case, seed, diff.mean(), diff.max())
    # The comparison can tell crops apart: a seed whose box differs (many seeds give the whole picture,
    # RandomResizedCrop's fallback when no drawn box fits) is far off.
    hw = ttf.decode(data).shape[1:]

    def box(seed):
        torch.manual_seed(seed)
        return RandomResizedCrop.get_params(torch.empty(3, *hw), list(ttf.scale), list(ttf.ratio))

    other = next((k for k in range(1, 200) if box(k) != box(0)), None)
    if other is not None:
        assert (pil_path(data, rn50_train_tf, other) - tensor_path(data, ttf, 0)).abs().mean() > 4 * MEAN_STEPS * STEP


def test_the_stream_gives_the_same_samples_and_crops_with_either_decoder(shards_dir):
    _, train_tf, _, tokenizer = create_model("cloob-tiny-vit")
    urls = sorted(str(p) for p in shards_dir.glob("*.tar"))

    def first_batches(transform, n=3):
        s = ShardStream(urls, batch_size=8, image_transform=transform, tokenizer=tokenizer, seed=3,
                        resampled=False, shuffle_buffer=16)
        s.start_epoch(0, None)
        it = iter(s)
        return [next(it) for _ in range(n)]

    pil, tensor = first_batches(train_tf), first_batches(TensorTrainTransform.of(train_tf))
    for a, b in zip(pil, tensor):
        assert torch.equal(a["text"], b["text"]) and a["raw_consumed"] == b["raw_consumed"]
        diff = (a["image"] - b["image"]).abs()
        assert diff.mean() < MEAN_STEPS * STEP and diff.max() <= MAX_STEPS * STEP


def test_undecodable_bytes_are_counted_as_corrupt_not_raised(tmp_path):
    import tarfile

    _, train_tf, _, tokenizer = create_model("cloob-tiny-vit")
    good = encoded(photo(1, 64, 64), "JPEG", quality=90)
    members = [("a.jpg", good), ("a.txt", b"a photo"), ("b.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("b.txt", b"x"),
               ("c.jpg", good[: len(good) // 3]), ("c.txt", b"cut short"), ("d.jpg", good), ("d.txt", b"another")]
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s = ShardStream([str(path)], batch_size=1, image_transform=TensorTrainTransform.of(train_tf), tokenizer=tokenizer,
                    resampled=False, shuffle_buffer=0)
    s.start_epoch(0, None)
    it = iter(s)  # in order (no shuffle buffer); the stream goes on into further passes, so take two
    first, second = next(it), next(it)
    assert first["raw_consumed"] == 1 and first["skips"]["corrupt_image"] == 0  # a
    # then b (not a JPEG) and c (cut short: libjpeg and PIL both refuse it) are skipped, and d comes
    assert second["raw_consumed"] == 4 and second["skips"]["corrupt_image"] == 2


def test_a_transform_it_cannot_run_is_refused_with_the_fix(rn50_train_tf):
    from torchvision.transforms import CenterCrop, Compose

    with pytest.raises(CloobError) as e:
        TensorTrainTransform.of(Compose([CenterCrop(224), *rn50_train_tf.transforms[1:]]))
    assert "CenterCrop" in str(e.value) and "data.decoder=pil" in str(e.value)


def test_the_default_decoder_leaves_the_hash_and_torchvision_changes_it():
    r = load_recipe("tiny")
    d = r.model_dump()
    assert d["data"]["decoder"] is None
    d["data"].pop("decoder")
    same = Recipe.model_validate(d)  # as a recipe written before the field existed
    assert r.content_hash() == same.content_hash() and r.content_hash(legacy=True) == same.content_hash(legacy=True)
    tv = load_recipe("tiny", ["data.decoder=torchvision"])
    assert tv.content_hash() != r.content_hash()
    with pytest.raises(Exception, match="decoder"):
        load_recipe("tiny", ["data.decoder=opencv"])
