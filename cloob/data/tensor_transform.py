"""open_clip's train preprocess run on tensors: decoded by torchvision, cropped and resized by torch.

open_clip's train transform for every architecture we train is RandomResizedCrop (bicubic, antialias) ->
convert to RGB -> to tensor -> Normalize, run on a PIL image. Run on a uint8 tensor from
torchvision.io.decode_jpeg instead, the same steps cost about half the CPU (bench/bench_decode.py:
the antialiased bicubic resize of torch's uint8 kernels is 3-6x PIL's; decoding is libjpeg-turbo
either way and gives the same pixels). The crop box is drawn by the same
RandomResizedCrop.get_params from the same generator state and the same picture size, so every
sample gets the same box as on the PIL path; the resized pixels differ by rounding only (both resizes
are antialiased bicubic: on average 0.05 of a step of 255 on the bench's JPEGs, under 0.3 on grainy
PNGs, single pixels at most a few steps; tests/test_tensor_transform.py). `data.decoder: torchvision` in a recipe picks this path
(cloob/train/loop.py); the default stays PIL, so earlier runs keep their trajectories.

A picture torchvision cannot decode (a PNG with a palette, a CMYK JPEG, a truncated file) is decoded
by PIL and goes on through the same tensor steps; PIL's open also keeps its decompression-bomb guard,
since it reads the header before torchvision decodes anything.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode, Normalize, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from cloob.errors import CloobError

_PASS_THROUGH = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")


class TensorTrainTransform:
    """RandomResizedCrop -> [RGB] -> [to tensor] -> Normalize, from encoded bytes to a float tensor."""

    def __init__(self, crop: RandomResizedCrop, normalize: Normalize):
        self.size = list(crop.size)
        self.scale, self.ratio = crop.scale, crop.ratio
        self.interpolation = crop.interpolation
        self.antialias = crop.antialias
        self.mean, self.std = list(normalize.mean), list(normalize.std)

    @classmethod
    def of(cls, compose) -> TensorTrainTransform:
        """The tensor form of an open_clip train Compose, or one error naming the step it cannot run."""
        steps = list(getattr(compose, "transforms", [compose]))
        names = [getattr(t, "__name__", None) or type(t).__name__ for t in steps]  # functions by their name
        core = [t for t, n in zip(steps, names) if n not in _PASS_THROUGH]
        if len(core) != 2 or not isinstance(core[0], RandomResizedCrop) or not isinstance(core[1], Normalize):
            raise CloobError(
                f"data.decoder=torchvision runs only RandomResizedCrop -> RGB -> ToTensor -> Normalize; this "
                f"model's train transform is {' -> '.join(names)}",
                "set data.decoder=pil (the default) for this architecture")
        if core[0].interpolation not in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
            raise CloobError(f"data.decoder=torchvision: the crop's {core[0].interpolation.value} resize is not "
                             "supported on tensors here", "set data.decoder=pil")
        return cls(core[0], core[1])

    def decode(self, data: bytes) -> torch.Tensor:
        """uint8 (3, H, W), RGB. PIL reads the header first (its size guard); torchvision decodes."""
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            if fmt not in ("JPEG", "PNG", "WEBP") or mode not in ("RGB", "L"):
                return _from_pil(im)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            if fmt == "JPEG":
                return decode_jpeg(buf, mode=ImageReadMode.RGB)
            return decode_image(buf, mode=ImageReadMode.RGB)
        except RuntimeError:  # what libjpeg/libpng refuse, PIL may still read (or raise OSError itself)
            with Image.open(io.BytesIO(data)) as im:
                return _from_pil(im)

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """The normalised (3, size, size) float tensor; the crop box drawn from torch's default generator."""
        return self(self.decode(data))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        box = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        return self.normalize(self.crop(img, box))

    def crop(self, img: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The uint8 (3, size, size) resize of the box (top, left, height, width) of img."""
        return F.resized_crop(img, *box, self.size, interpolation=self.interpolation, antialias=self.antialias)

    def normalize(self, crop: torch.Tensor) -> torch.Tensor:
        return F.normalize(crop.float().div_(255), self.mean, self.std)


def _from_pil(im: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
