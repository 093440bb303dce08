"""Numbers read from the environment (CLOOB_* limits: S3 time limits, shard-read retries, how long a
lost server or node is waited for): one parser, one error naming the variable and the fix."""

from __future__ import annotations

import os

from cloob.errors import CloobError


def env_number(name: str, default: float, *, integer: bool = False, positive: bool = False) -> float | int:
    """The number in environment variable `name`, or `default` where it is unset or empty. Anything
    else, or a negative number (with `positive`, zero too), is one CloobError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or value < 0 or (positive and value == 0):
        kind = f"{'positive' if positive else 'non-negative'} {'whole ' if integer else ''}number"
        raise CloobError(f"{name}={raw!r} is not a {kind}", f"set {name} to e.g. {default:g}, or unset it for the default")
    return value
