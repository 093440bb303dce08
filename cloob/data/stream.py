"""An endless, deterministic, resumable stream of (image, tokens) batches from webdataset shards.

Each (epoch, rank, logical worker) draws its own shard sequence from a seeded RNG: resampled (shards
drawn with replacement) or, with resampled=False, a seeded permutation of the shards split across all
ranks x workers and repeated. Tar members are grouped into samples by webdataset, shuffled in a
seeded buffer, then decoded. Image augmentation is seeded per sample, so a sample's crop depends only
on its position in the stream.

Exact resume: every batch carries its logical worker id and how many raw (undecoded) samples that
worker has drawn so far. The trainer stores these positions in the checkpoint; on resume each worker
skips that many raw samples without decoding them, and the worker order is rotated so that the
DataLoader's round-robin continues where it stopped.

Rows that a dataset version leaves out (removed from its source; cloob.data.shards) are skipped by
their sample key before the shuffle buffer, as if the shards did not hold them.

Bad data never stops training: a corrupt image, a missing or undecodable caption, and a truncated or
unreadable shard are skipped and counted; the counts travel with the batches. A shard in a bucket is
read through cloob.data.remote: a connection dropped mid-shard is reopened at the byte where it broke
(the same bytes, so the same samples in the same order), and each reopen is counted (`read_retries`
in the batches); a shard that stays unreadable after its retries is a bad shard, skipped and
counted. Data with nothing usable raises NoUsableData naming why (shards that give no sample at
all, or samples all skipped), rather than hanging; a set smaller than the shuffle buffer is not such
data: it fills the buffer from repeated passes over its shards, and trains.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from cloob.data.remote import open_shard

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("corrupt_image", "missing_caption", "bad_shard")

# PIL refuses absurdly large images (decompression bombs) with an error, which we count as corrupt.
Image.MAX_IMAGE_PIXELS = 89_478_485


class NoUsableData(RuntimeError):
    """Raised in a worker when shard after shard yields no usable sample (all corrupt or unreadable)."""


@dataclass
class SkipCounts:
    corrupt_image: int = 0
    missing_caption: int = 0
    bad_shard: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SKIP_REASONS}

    @property
    def total(self) -> int:
        return self.corrupt_image + self.missing_caption + self.bad_shard


@dataclass
class StreamState:
    """Where each logical worker of one rank stands within the current epoch."""

    raw_consumed: dict[int, int] = field(default_factory=dict)
    batches: int = 0
    skips: dict[int, dict[str, int]] = field(default_factory=dict)
    retries: dict[int, int] = field(default_factory=dict)  # shard reads reopened after a dropped connection

    def update(self, batch: dict) -> None:
        w = int(batch["worker"])
        self.raw_consumed[w] = int(batch["raw_consumed"])
        self.skips[w] = {k: int(v) for k, v in batch["skips"].items()}
        self.retries[w] = int(batch.get("read_retries", 0))
        self.batches += 1

    def retry_total(self) -> int:
        return sum(self.retries.values())

    def skip_totals(self) -> dict[str, int]:
        out = dict.fromkeys(SKIP_REASONS, 0)
        for s in self.skips.values():
            for k, v in s.items():
                out[k] += v
        return out

    def to_dict(self) -> dict:
        return {"raw_consumed": dict(self.raw_consumed), "batches": self.batches,
                "skips": {w: dict(s) for w, s in self.skips.items()}, "retries": dict(self.retries)}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls({int(k): int(v) for k, v in d["raw_consumed"].items()}, int(d["batches"]),
                   {int(k): dict(v) for k, v in d["skips"].items()},
                   {int(k): int(v) for k, v in d.get("retries", {}).items()})  # absent before they were counted


def _seed(*parts: int) -> int:
    # A stable mix (Python's hash() of tuples is stable for ints, but make it explicit).
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h


class ShardStream(IterableDataset):
    """Yields dict batches: image (B,3,H,W), text (B,L), worker, raw_consumed, skips, read_retries."""

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        image_transform: Callable,
        tokenizer: Callable,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        expected_counts: dict[str, int] | None = None,
        exclude_keys: frozenset[str] | set[str] | None = None,
    ):
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        # Samples per shard from its stats file: a shard that yields fewer was cut short, even where
        # tarfile mistakes a cut at a header for the end of the archive and raises nothing.
        self.expected_counts = dict(expected_counts or {})
        # Samples of rows that a dataset version leaves out (removed from its source: ShardSet.exclude_keys):
        # never read, as if not in the shards. They still count towards the shard's expected count.
        self.exclude_keys = frozenset(exclude_keys or ())
        self.epoch = 0
        self.resume: StreamState = StreamState()
        self.steps_per_epoch: int | None = None

    def start_epoch(self, epoch: int, resume: StreamState | None = None,
                    steps_per_epoch: int | None = None) -> None:
        """Set before creating the DataLoader iterator; workers copy these attributes.

        With steps_per_epoch, each worker goes on into the following epochs by itself (one
        DataLoader serves the whole run, no worker restarts); without it, the epoch never ends.
        """
        self.epoch = epoch
        self.resume = resume or StreamState()
        self.steps_per_epoch = steps_per_epoch

    # -- the pipeline, run inside each DataLoader worker ------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batch g (counted from its start) from physical worker g % W. In-epoch
        # batch i of epoch e is loader batch base(e) + i, with base(first) = -(batches already done)
        # and base(e + 1) = base(e) + steps_per_epoch. Physical worker w therefore serves the
        # in-epoch batches i = w - base(e) (mod W): it plays logical worker (w - base(e)) mod W.
        epoch, base, spe = self.epoch, -self.resume.batches, self.steps_per_epoch
        resume: StreamState | None = self.resume
        while True:
            logical = (worker_id - base) % num_workers
            first = resume.batches if resume is not None else 0
            if spe is None:
                yield from self._epoch(epoch, logical, num_workers, resume, limit=None)
                return
            first_mine = first + (logical - first) % num_workers
            yield from self._epoch(epoch, logical, num_workers, resume,
                                   limit=len(range(first_mine, spe, num_workers)))
            epoch, base, resume = epoch + 1, base + spe, None

    def _epoch(self, epoch: int, logical: int, num_workers: int, resume: StreamState | None,
               limit: int | None) -> Iterator[dict]:
        """This logical worker's batches of one epoch (at most limit of them)."""
        if limit == 0:
            return
        resume = resume or StreamState()
        counts = SkipCounts(**resume.skips.get(logical, {}))
        # Resume replays the raw stream up to the checkpoint, which meets its bad shards again and
        # counts them anew; restoring their saved count as well would count each one twice.
        counts.bad_shard = 0
        # Reopens after a dropped connection are not replayed by a resume (the network differs): kept.
        tracker = _ShardTracker(counts, resume.retries.get(logical, 0), self.expected_counts,
                                barren_limit=10 * len(self.shards) + 10)
        rng = random.Random(_seed(self.seed, epoch, self.rank, logical))

        # The stages: shards opened and numbered -> tar members -> samples (a shard cut short counted)
        # -> rows the dataset version leaves out dropped -> the shuffle buffer -> decoded batches.
        shards = tracker.numbered(self._open_shards(rng, epoch, logical, num_workers, tracker.count_retry))
        members = tar_file_expander(shards, handler=tracker.handler)
        samples = tracker.check_complete(group_by_keys(members, handler=tracker.handler))
        kept = (s for s in samples if s.get("__key__") not in self.exclude_keys) if self.exclude_keys else samples
        shuffled = _buffer_shuffle(kept, self.shuffle_buffer, rng, on_full=tracker.buffer_filled)
        yield from self._batches(shuffled, epoch, logical, tracker, skip_raw=resume.raw_consumed.get(logical, 0),
                                 limit=limit)

    def _batches(self, shuffled: Iterator[dict], epoch: int, logical: int, tracker: _ShardTracker,
                 skip_raw: int, limit: int | None) -> Iterator[dict]:
        """Decoded samples in batches, each carrying the worker's position and counts (at most limit)."""
        images, texts, produced = [], [], 0
        for index, sample in enumerate(shuffled, start=1):
            if index <= skip_raw:
                tracker.usable()
                continue  # resume: already consumed before the checkpoint; not decoded
            decoded = self._decode(sample, epoch, index, logical, tracker.counts)
            if decoded is None:
                continue
            tracker.usable()
            images.append(decoded[0])
            texts.append(decoded[1])
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "text": self.tokenizer(texts),
                    "epoch": epoch,
                    "worker": logical,
                    "raw_consumed": index,
                    "skips": tracker.counts.as_dict(),
                    "read_retries": tracker.retries,
                }
                images, texts = [], []
                produced += 1
                if produced == limit:
                    return

    def _open_shards(self, rng: random.Random, epoch: int, logical: int, num_workers: int,
                     on_retry: Callable[[int], None] | None = None) -> Iterator[dict]:
        for url in self._shard_sequence(rng, epoch, logical, num_workers):
            try:
                stream = open_shard(url, on_retry)
            except (OSError, ValueError) as e:
                # Unreadable shard: counted by the expander's handler through the raised error.
                yield {"url": url, "stream": _RaisingStream(e)}
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    def _shard_sequence(self, rng: random.Random, epoch: int, logical: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.shards)
        total = self.world_size * num_workers
        part = self.rank * num_workers + logical
        if len(self.shards) < total:
            raise ValueError(
                f"{len(self.shards)} shards cannot be split across {total} ranks x workers; "
                "use data.resampled=true or fewer data.workers"
            )
        passes = 0
        while True:  # the same permutation on every rank and worker, so the parts are disjoint
            perm = list(self.shards)
            random.Random(_seed(self.seed, epoch, passes)).shuffle(perm)
            yield from perm[part::total]
            passes += 1

    def _decode(self, sample: dict, epoch: int, index: int, logical: int, counts: SkipCounts):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            counts.corrupt_image += 1
            return None
        caption = sample.get("txt")
        try:
            caption = caption.decode("utf-8").strip() if caption is not None else ""
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            counts.missing_caption += 1
            return None
        decode = getattr(self.image_transform, "decode", None)  # a tensor transform decodes its own input
        try:
            if decode is not None:
                image = decode(sample[ext])
            else:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    image = im.convert("RGB")
        except (OSError, ValueError, RuntimeError, Image.DecompressionBombError, SyntaxError):
            counts.corrupt_image += 1
            return None
        # The crop of a sample depends only on its place in the stream: resume replays it exactly.
        # Only the CPU generator is touched: torch.manual_seed would also queue a lazy CUDA seeding
        # with a captured stack trace (130 us a sample, against 2 us for this).
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(_seed(self.seed, epoch, self.rank, logical, index) & 0x7FFFFFFFFFFFFFFF)
        try:
            tensor = self.image_transform(image)
        finally:
            gen.set_state(saved)
        return tensor, caption


class _ShardTracker:
    """One logical worker's bookkeeping over the shards of one epoch, for the stages of
    ShardStream._epoch: shards numbered as they are opened (the same shard can be drawn twice in a
    row), a bad shard counted once, a shard cut short found, reopened reads counted, and the guard
    that turns data with nothing usable into NoUsableData instead of an endless search.

    An endless stream over shards that are all bad would hang training without a word. Draws with
    replacement can hit bad shards many times in a row by chance, hence the wide margin. Two counts,
    as a set smaller than the shuffle buffer is intact data: the buffer takes many passes over its
    shards before the first sample leaves it.
    - silent: shards opened since the last raw sample reached the buffer (unreadable, empty);
    - barren: shards opened, once the buffer is full, since the last usable sample (corrupt).
    """

    def __init__(self, counts: SkipCounts, retries: int, expected_counts: dict[str, int], barren_limit: int):
        self.counts = counts
        self.retries = retries  # shard reads reopened after a dropped connection
        self.expected_counts = expected_counts
        self.barren_limit = barren_limit
        self.opened: dict[int, str] = {}  # ordinal -> url, until the shard has been checked
        self.bad: set[int] = set()  # ordinals already counted as bad
        self.current = -1  # the ordinal of the shard being read
        self.silent = self.barren = 0
        self.buffer_full = False

    def count_retry(self, _n: int) -> None:
        self.retries += 1

    def buffer_filled(self) -> None:
        self.buffer_full = True

    def usable(self) -> None:
        """A usable sample left the buffer (or was skipped by a resume)."""
        self.barren = 0

    def count_bad(self, ordinal: int, why: str) -> None:
        # One bad shard can raise twice (a truncated member, then the next header): count it once.
        if ordinal not in self.bad:
            self.bad.add(ordinal)
            self.counts.bad_shard += 1
            log.warning("skipping the rest of a bad shard (%s): %s", self.opened.get(ordinal), why[:300])

    def handler(self, exn: Exception) -> bool:
        """webdataset's handler: the shard being read is bad; go on with the next."""
        self.count_bad(self.current, repr(exn))
        return True

    def numbered(self, sources: Iterator[dict]) -> Iterator[dict]:
        """The opened shards, each url replaced by (ordinal, url); raises NoUsableData past the limit."""
        for source in sources:
            self.silent += 1
            self.barren += self.buffer_full
            if self.silent > self.barren_limit:
                raise NoUsableData(
                    f"{self.barren_limit} shards in a row gave no sample at all (skipped so far: "
                    f"{self.counts.as_dict()}); the shards are unreadable or empty")
            if self.barren > self.barren_limit:
                raise NoUsableData(
                    f"{self.barren_limit} shards in a row gave no usable sample (skipped so far: "
                    f"{self.counts.as_dict()}); {_why_unusable(self.counts)}")
            self.current += 1
            self.opened[self.current] = source["url"]
            yield {**source, "url": (self.current, source["url"])}

    def check_complete(self, samples: Iterator[dict]) -> Iterator[dict]:
        """The samples, unchanged; a shard that gave fewer than its expected count is counted as bad.
        webdataset yields a shard's last sample once the next shard has started, so shard k is checked
        when a sample of a later shard arrives."""
        checking, seen = 0, 0
        for sample in samples:
            ordinal = sample["__url__"][0]
            while checking < ordinal:
                expected = self.expected_counts.get(self.opened.get(checking))
                if expected is not None and seen < expected:
                    self.count_bad(checking, f"{seen} of {expected} samples: the tar was cut short")
                self.bad.discard(checking)
                self.opened.pop(checking, None)
                checking, seen = checking + 1, 0
            seen += 1
            self.silent = 0
            yield sample


class _RaisingStream(io.RawIOBase):
    def __init__(self, exc: Exception):
        self.exc = exc

    def read(self, *a):
        raise self.exc

    def readinto(self, b):
        raise self.exc


def _why_unusable(counts: SkipCounts) -> str:
    """What the skip counts say about data that gives no usable sample."""
    parts = [f"{n} {what}" for n, what in ((counts.corrupt_image, "corrupt images"),
                                            (counts.missing_caption, "missing captions"),
                                            (counts.bad_shard, "unreadable shards")) if n]
    return f"the data is unusable: {', '.join(parts)}" if parts else "the data is unusable"


def _buffer_shuffle(samples: Iterator[dict], bufsize: int, rng: random.Random,
                    on_full: Callable[[], None] | None = None) -> Iterator[dict]:
    """Samples shuffled in a buffer of `bufsize`; on_full() is called once the buffer is full (from
    then on every sample taken in lets one out)."""
    on_full = on_full or (lambda: None)
    if bufsize <= 1:
        on_full()
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            if len(buf) == bufsize:
                on_full()
            continue
        i = rng.randrange(bufsize)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf
