"""JPEG decoding for the RN50 training input: PIL (what the pipeline uses) against torchvision's decode_jpeg.

Three paths from the same JPEG bytes to the normalised 224 x 224 float tensor the model eats, each with the
RN50 recipe's train augmentation (RandomResizedCrop(224, scale 0.9-1.0, ratio 3/4-4/3, bicubic, antialias),
then open_clip's mean/std normalisation):

    pil        PIL open + convert('RGB'), the crop on the PIL image, to-tensor + normalise: what
               cloob.data.stream runs in each DataLoader worker (open_clip's RN50 train preprocess).
    tv_cpu     torchvision.io.decode_jpeg on the CPU (libjpeg-turbo, as PIL) to a uint8 CHW tensor, the same
               crop with torchvision.transforms.v2.functional.resized_crop on the tensor, then float + normalise.
    tv_cuda    (--device cuda) decode_jpeg of a whole batch on the GPU (nvJPEG), the crop per image on the GPU,
               stacked and normalised there: the data loader would then only read bytes and tokenise.

Per path: CPU milliseconds per image on one thread (pil, tv_cpu; the process's CPU time over --images
images after a warm-up, so a shared machine's waiting does not count; hyperthread and cache contention
do) and, on the GPU, images/s for batches of --batch (CUDA-synchronised wall time) with the host CPU
seconds it took per image (the cores the GPU path still needs). Fidelity, per image with the same crop box:
the mean and max absolute difference (in 0-255 steps) of tv_cpu's and tv_cuda's 224 x 224 result against
PIL's, and of the decoded pixels alone (decoders may differ in IDCT and chroma upsampling). A path that
changes the pixels changes the augmentation's distribution by that much; the numbers say how much.

The JPEGs: bench_pipeline.py's photo-like pictures (1/f noise, shapes, grain; 640x480 to 1024x683), resized
with PIL's bicubic so the shorter side is --size (img2dataset's keep_ratio at image_size 256 uses OpenCV's
INTER_AREA; for decoding the size and quality are what matter) and saved at quality 95, as data_specs/cc3m.yaml.

Usage: python bench/bench_decode.py [--device cpu|cuda] [--images 200] [--size 256] [--batch 256]
                                    [--json PATH] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HEADING = "## JPEG decoding for the RN50 input: PIL against torchvision's decode_jpeg (CPU; the GPU in gpu_check)"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD, as RN50's preprocess
STD = (0.26862954, 0.26130258, 0.27577711)


def make_jpegs(n: int, size: int) -> list[bytes]:
    from bench_pipeline import photo_jpeg
    from PIL import Image

    out = []
    for i in range(n):
        with Image.open(io.BytesIO(photo_jpeg(i))) as im:
            im = im.convert("RGB")
            s = size / min(im.size)
            im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            out.append(buf.getvalue())
    return out


def crop_boxes(jpegs: list[bytes], seed: int = 0) -> list[tuple[int, int, int, int]]:
    """One RandomResizedCrop(224, scale 0.9-1.0) box (top, left, height, width) per picture, seeded."""
    import torch
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)  # get_params draws from torch's global generator
    boxes = []
    for b in jpegs:
        with Image.open(io.BytesIO(b)) as im:
            w, h = im.size
        boxes.append(RandomResizedCrop.get_params(torch.empty(3, h, w), scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)))
    return boxes


def pil_path(b: bytes, box):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(io.BytesIO(b)) as im:
        img = im.convert("RGB")
    c = TF.resized_crop(img, *box, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.to_tensor(c), MEAN, STD), torch.from_numpy(np.array(c)).permute(2, 0, 1)


def tv_path(b: bytes, box, device: str = "cpu"):
    """data.decoder=torchvision: the product's TensorTrainTransform (cloob/data/tensor_transform.py) with a
    given box; on the GPU, decode_jpeg on the device, then the same crop and normalisation there."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    ttf = _tensor_transform()
    if device == "cpu":
        img = ttf.decode(b)
    else:
        img = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)
    c = ttf.crop(img, box)
    return ttf.normalize(c), c


_TTF = []


def _tensor_transform():
    """RN50's train transform in the tensor form the RN50 recipes run (made once)."""
    if not _TTF:
        from cloob.data.tensor_transform import TensorTrainTransform
        from cloob.model import create_model

        _TTF.append(TensorTrainTransform.of(create_model("RN50")[1]))
    return _TTF[0]


def timed_cpu(fn, jpegs, boxes, repeats: int = 3) -> float:
    """CPU milliseconds per image (this process's CPU time: one thread, so waiting for a core on a shared
    machine does not count), median of `repeats` passes over all images after a warm-up."""
    for b, box in zip(jpegs[:20], boxes[:20]):
        fn(b, box)
    passes = []
    for _ in range(repeats):
        t0 = time.process_time()
        for b, box in zip(jpegs, boxes):
            fn(b, box)
        passes.append(1000 * (time.process_time() - t0) / len(jpegs))
    return statistics.median(passes)


def diff_stats(a_list, b_list) -> dict:
    import torch

    means, maxes = [], []
    for a, b in zip(a_list, b_list):
        d = (a.to("cpu", torch.int16) - b.to("cpu", torch.int16)).abs()
        means.append(d.float().mean().item())
        maxes.append(int(d.max()))
    return {"mean_abs": statistics.mean(means), "max_abs": max(maxes)}


def decoded_pixels(jpegs, device: str = "cpu"):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    pil, tv = [], []
    for b in jpegs:
        with Image.open(io.BytesIO(b)) as im:
            pil.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        tv.append(decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device))
    return pil, tv


def cuda_path(jpegs, boxes, batch: int, repeats: int = 3) -> dict:
    """Images/s of batched nvJPEG decoding + per-image crop + normalise on the GPU, and host CPU s per image."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    ttf = _tensor_transform()
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    mean = torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(STD, device="cuda").view(1, 3, 1, 1)

    def one_batch(lo: int):
        ims = decode_jpeg(datas[lo:lo + batch], mode=ImageReadMode.RGB, device="cuda")
        crops = [ttf.crop(im, box) for im, box in zip(ims, boxes[lo:lo + batch])]
        return (torch.stack(crops).float().div_(255) - mean) / std

    one_batch(0)
    torch.cuda.synchronize()
    rates, cpu_per_image = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        n = 0
        for lo in range(0, len(datas), batch):
            one_batch(lo)
            n += len(datas[lo:lo + batch])
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rates.append(n / wall)
        cpu_per_image.append(1000 * cpu / n)
    return {"images_per_s": statistics.median(rates), "host_cpu_ms_per_image": statistics.median(cpu_per_image)}


def run(device: str, images: int, size: int, batch: int) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    jpegs = make_jpegs(images, size)
    boxes = crop_boxes(jpegs)
    info = {"device": device, "images": images, "size": size, "batch": batch,
            "kb_mean": sum(map(len, jpegs)) / len(jpegs) / 1024, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "make_s": round(time.perf_counter() - t0, 1)}
    info["pil_ms"] = timed_cpu(pil_path, jpegs, boxes)
    info["tv_cpu_ms"] = timed_cpu(tv_path, jpegs, boxes)
    pil_out = [pil_path(b, box)[1] for b, box in zip(jpegs, boxes)]
    info["tv_cpu_vs_pil"] = diff_stats([tv_path(b, box)[1] for b, box in zip(jpegs, boxes)], pil_out)
    p, t = decoded_pixels(jpegs)
    info["tv_cpu_decode_vs_pil"] = diff_stats(t, p)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["tv_cuda"] = cuda_path(jpegs, boxes, batch)
        info["tv_cuda_vs_pil"] = diff_stats([tv_path(b, box, "cuda")[1] for b, box in zip(jpegs, boxes)], pil_out)
        p, t = decoded_pixels(jpegs, "cuda")
        info["tv_cuda_decode_vs_pil"] = diff_stats(t, p)
    return info


def table(info: dict) -> str:
    rows = ["| path | ms per image, one CPU thread | images/s | host CPU ms per image | result vs PIL's: mean / max "
            "abs diff (0-255) | decoded pixels vs PIL's: mean / max |", "|---|---:|---:|---:|---|---|"]
    rows.append(f"| pil (data.decoder unset: the default) | {info['pil_ms']:.2f}"
                f" | {1000 / info['pil_ms']:.0f} per core | {info['pil_ms']:.2f} | - | - |")
    d, dd = info["tv_cpu_vs_pil"], info["tv_cpu_decode_vs_pil"]
    rows.append(f"| tv_cpu (data.decoder=torchvision: the RN50 recipes) | {info['tv_cpu_ms']:.2f}"
                f" | {1000 / info['tv_cpu_ms']:.0f} per core | {info['tv_cpu_ms']:.2f} | "
                f"{d['mean_abs']:.2f} / {d['max_abs']} | {dd['mean_abs']:.3f} / {dd['max_abs']} |")
    if "tv_cuda" in info:
        g, d, dd = info["tv_cuda"], info["tv_cuda_vs_pil"], info["tv_cuda_decode_vs_pil"]
        rows.append(f"| tv_cuda (batch {info['batch']}, {info.get('gpu', 'GPU')}) | - | {g['images_per_s']:,.0f} | "
                    f"{g['host_cpu_ms_per_image']:.2f} | {d['mean_abs']:.2f} / {d['max_abs']} | "
                    f"{dd['mean_abs']:.3f} / {dd['max_abs']} |")
    return "\n".join(rows)


def section(info: dict) -> str:
    from bench_train import machine

    return (f"{HEADING}\n\n- Machine: {machine()}\n- Date: {info['date']}\n- Command: `{info['command']}`\n"
            f"- Load average at start: {info['load']}\n- {info['images']} photo-like JPEGs, shorter side "
            f"{info['size']} px, quality 95, {info['kb_mean']:.1f} KB on average; torchvision "
            f"{info['torchvision']}; one RandomResizedCrop(224, scale 0.9-1.0) box per picture, the same box "
            "for every path; CPU times (process CPU time, one thread) are the median of 3 passes after a warm-up\n\n"
            + table(info) + "\n\nSee the docstring of bench/bench_decode.py for the method.\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default="")
    ap.add_argument("--write", action="store_true", help="write the CPU section of BENCHMARKS.md")
    ap.add_argument("--report", default="", help="write the section from a saved --json instead of measuring")
    args = ap.parse_args()
    if args.report:
        from report import write_section

        info = json.loads(Path(args.report).read_text())
        info["table"] = table(info)
        print(section(info))
        if args.write:
            write_section(HEADING, section(info))
        return 0
    info = run(args.device, args.images, args.size, args.batch)
    info.update(date=f"{_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
                command=f"python bench/bench_decode.py {' '.join(sys.argv[1:])}",
                load=" ".join(f"{v:.2f}" for v in os.getloadavg()), table=table(info))
    print(info["table"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    if args.write:
        from report import write_section

        write_section(HEADING, section(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
