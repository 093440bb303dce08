"""Reading PyTorch files that anyone who can write a run folder may have written: plain data only.

torch.load(weights_only=True) builds tensors, numbers, strings, lists, tuples and dicts, plus the
globals allowed here; a file that asks for any other global (exec, os.system, a class with a
__reduce__) is refused before anything of it runs. The sha256 digests in meta.json guard against
damage, not against a hostile folder: whoever writes the files can rewrite meta.json too.
"""

from __future__ import annotations

import io
import re

_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")  # torch prints "only if you trust the source" in bold
_GLOBAL = re.compile(r"GLOBAL (\S+?)(?: was not|\s|$)")


def _numpy_rng_globals() -> list:
    """What np.random.get_state() pickles to (the training state keeps each rank's NumPy RNG state):
    an ndarray of uint32 rebuilt by numpy's _reconstruct, under NumPy 2's name and NumPy 1's."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct

    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct")]


def text_of(e: BaseException) -> str:
    """An exception's first line without terminal escape codes, at most 200 characters."""
    text = _ESCAPES.sub("", str(e)).strip()
    return text.splitlines()[0][:200] if text else ""


def refused_global(e: BaseException) -> str | None:
    """The global a weights_only load refused to call (e.g. 'exec'); None if it failed otherwise."""
    found = _GLOBAL.search(_ESCAPES.sub("", str(e)))
    return found.group(1) if found else None


def load(data: bytes, map_location="cpu", *, numpy_rng: bool = False):
    """torch.load of bytes as plain data (numpy_rng: NumPy's RNG state allowed too). Raises what
    torch.load raises: pickle.UnpicklingError for a refused global (see refused_global)."""
    import torch

    allowed = _numpy_rng_globals() if numpy_rng else []
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def why_not_loaded(e: BaseException) -> str:
    """What a failed load says in an error message: a refused global as 'not plain data', anything
    else (garbage bytes, a truncated file) as its exception type and first line."""
    name = refused_global(e)
    if name:
        return f"is not plain data: loading it would call {name}; it was not loaded and nothing of it ran"
    return f"cannot be read: {type(e).__name__}: {text_of(e)}"
