"""The paper's published zero-shot numbers (paper_zero_shot.csv) and the choice of the setting shown
next to our checkpoints in `cloob results` (auto, none or PRETRAINING:ENCODER[:EPOCHS])."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cloob.errors import CloobError

if TYPE_CHECKING:
    from cloob.results.arrange import Checkpoint

PAPER_CSV = Path(__file__).with_name("paper_zero_shot.csv")
DEFAULT_PAPER = ("cc3m", "RN50", "128")


@dataclass(frozen=True)
class Ref:
    """A published number (percent) with its standard deviation where the paper gives one."""

    value: float
    std: float | None = None

    def __str__(self) -> str:
        return f"{self.value:.2f}" + (f" ±{self.std:.2f}" if self.std is not None else "")


class PaperReference(NamedTuple):
    """The chosen published setting; epochs is text as in the CSV ('' where the paper gives none)."""

    pretraining: str
    encoder: str
    epochs: str

    @property
    def label(self) -> str:
        return f"{self.pretraining} {self.encoder}" + (f" {self.epochs}ep" if self.epochs else "")

    def column(self, method: str) -> str:
        from cloob.methods import METHODS

        name = METHODS[method].label if method in METHODS else method.upper()
        return f"paper {name} ({self.label})"


# ------------------------------------------------------------------------------------ the paper

def load_paper(path: str | Path | None = None) -> list[dict]:
    """The shipped published numbers, one dict per CSV row, as text: pretraining, encoder, method,
    epochs ('' for yfcc15m), dataset, top1_percent, std_percent ('' where not given), source."""
    with open(path or PAPER_CSV, newline="") as f:
        return list(csv.DictReader(f))


def _encoder(arch: str | None) -> str | None:
    # OpenAI-trained weights load as RN50-quickgelu: the same encoder as the paper's RN50.
    return re.sub(r"-quickgelu$", "", arch, flags=re.IGNORECASE) if arch else None


def _paper_choices(paper_rows: list[dict]) -> list[PaperReference]:
    return list(dict.fromkeys(PaperReference(r["pretraining"], r["encoder"], r["epochs"].strip())
                              for r in paper_rows))


def _choices_text(choices: list[PaperReference]) -> str:
    return ", ".join(":".join(x for x in c if x) for c in choices)


def _match(choices: list[PaperReference], pretraining: str, encoder: str,
           epochs: str | None = None) -> PaperReference | None:
    """The choice for (pretraining, encoder[, epochs]), case-insensitively; the longest training when
    epochs is not given (cc3m: 128 epochs)."""
    found = [c for c in choices if c.pretraining.lower() == pretraining.lower()
             and c.encoder.lower() == encoder.lower() and (epochs is None or c.epochs == epochs)]
    return max(found, key=lambda c: int(c.epochs or 0)) if found else None


def choose_paper(paper: str | None, checkpoints: list[Checkpoint],
                 paper_rows: list[dict] | None = None) -> PaperReference | None:
    """auto | none | PRETRAINING:ENCODER[:EPOCHS] -> the published setting shown (None for none).

    auto: the (pretraining data, encoder) most common among the checkpoints that the paper has
    numbers for, else cc3m RN50 128 epochs."""
    if paper is None or paper.lower() == "none":
        return None
    choices = _paper_choices(load_paper() if paper_rows is None else paper_rows)
    if paper.lower() == "auto":
        shown = Counter((c.pretraining_data, _encoder(c.arch)) for c in checkpoints
                        if c.pretraining_data and c.arch)
        for (pre, enc), _ in shown.most_common():  # ties: the first shown
            choice = _match(choices, pre, enc)
            if choice:
                return choice
        return _match(choices, *DEFAULT_PAPER)
    parts = paper.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and not parts[2].isdigit()):
        raise CloobError(f"--paper {paper!r} is not auto, none or PRETRAINING:ENCODER[:EPOCHS]",
                         f"use one of: auto, none, {_choices_text(choices)}")
    choice = _match(choices, parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    if choice is None:
        raise CloobError(f"the paper has no numbers for {paper!r}", f"use one of: auto, none, {_choices_text(choices)}")
    return choice


def matched_settings(checkpoints: list[Checkpoint], paper_rows: list[dict] | None = None) -> list[PaperReference]:
    """Every published setting that some checkpoint matches by pretraining data and encoder (the longest
    training where the paper has several), in the checkpoints' order."""
    choices = _paper_choices(load_paper() if paper_rows is None else paper_rows)
    found = [_match(choices, c.pretraining_data, _encoder(c.arch)) for c in checkpoints
             if c.pretraining_data and c.arch]
    return list(dict.fromkeys(s for s in found if s))


def setting_for(pretraining: str, arch: str | None, epochs: int | None,
                paper_rows: list[dict] | None = None) -> PaperReference | None:
    """The published setting of this pretraining data, encoder and epochs (a setting the paper gives
    without epochs, as yfcc15m's, matches any), or None when the paper has none."""
    choices = _paper_choices(load_paper() if paper_rows is None else paper_rows)
    encoder = _encoder(arch) or ""
    return _match(choices, pretraining, encoder, str(epochs or "")) or _match(choices, pretraining, encoder, "")


def paper_values(choice: PaperReference, paper_rows: list[dict] | None = None) -> tuple[dict[str, dict[str, Ref]], str]:
    """(method -> dataset -> Ref in percent, the source text) for a chosen setting."""
    values: dict[str, dict[str, Ref]] = {}
    sources = []
    for r in load_paper() if paper_rows is None else paper_rows:
        if PaperReference(r["pretraining"], r["encoder"], r["epochs"].strip()) == choice:
            std = r["std_percent"].strip()
            ref = Ref(float(r["top1_percent"]), float(std) if std else None)
            values.setdefault(r["method"], {})[r["dataset"]] = ref
            sources.append(r["source"])
    return values, "; ".join(dict.fromkeys(sources))
