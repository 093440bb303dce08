"""Models: any open_clip architecture by name, built offline, with inv_tau in `logit_scale`.

The tiny configurations in cloob/model_configs/ (cloob-tiny-vit, cloob-tiny-rn) are registered with
open_clip on import, so plain open_clip can build them too after `open_clip.add_model_config(
cloob.model.MODEL_CONFIGS_DIR)`. inv_tau = 1/tau is stored as log(inv_tau) in open_clip's
`logit_scale`, so our checkpoints load unchanged in open_clip.
"""

from __future__ import annotations

import logging
import math

import open_clip
import torch

from cloob.architectures import MODEL_CONFIGS_DIR, check_architecture
from cloob.errors import CloobError

INV_TAU_MIN, INV_TAU_MAX = 1.0, 100.0

open_clip.add_model_config(MODEL_CONFIGS_DIR)


class _QuietRandomInit(logging.Filter):
    # open_clip warns on the root logger for every pretrained=None build; that is our normal case.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())


def model_config(arch: str) -> dict:
    check_architecture(arch)
    return open_clip.get_model_config(arch)


def create_model(arch: str, inv_tau: float = 30.0, learn_inv_tau: bool = False, device="cpu"):
    """(model, train_transform, val_transform, tokenizer) for an open_clip architecture, offline."""
    check_architecture(arch)
    model, train_tf, val_tf = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    set_inv_tau(model, inv_tau)
    model.logit_scale.requires_grad_(learn_inv_tau)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, train_tf, val_tf, tokenizer


def set_inv_tau(model, inv_tau: float) -> None:
    if not INV_TAU_MIN <= inv_tau <= INV_TAU_MAX:
        raise CloobError(f"inv_tau={inv_tau} is outside [1, 100]", "choose model.inv_tau in [1, 100]")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(inv_tau))


def clamp_inv_tau_(model) -> None:
    """The reference run's rule for a learnable inv_tau: clamp to [1, 100] after every step."""
    with torch.no_grad():
        model.logit_scale.clamp_(math.log(INV_TAU_MIN), math.log(INV_TAU_MAX))


def inv_tau(model) -> torch.Tensor:
    return model.logit_scale.exp()
