"""Names that become paths: one check for all of them.

A study, a data spec, a run, a downstream set and a registry alias each name a folder in a store
(<store>/studies/<name>/, datasets/<name>/, runs/<name>/, <downstream>/<name>/, registry/aliases/<name>/).
Joined unchecked, a name like `../../evil`, `a/b`, `/etc` or `s3://other/x` writes outside the store
(or into another one). Each loader checks its name here, where the name is read or given, before
anything runs: one message naming the field, the value and the fix.
"""

from __future__ import annotations

import re

from cloob.errors import CloobError

# Letters, digits, '.', '_', '-' and '+' (default run names carry values like 1e+3), starting with a
# letter or digit: one path component that is neither '.' nor '..', and not hidden ('.'-names are
# left out of listings: writes in progress); 200 characters at most, under every file system's limit.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")

FIX = ("use a plain name: letters, digits, '.', '_', '-' and '+', starting with a letter or digit, at most 200 "
       "characters (no '/', '..', ':' or spaces), e.g. my-study_2")


def name_problem(value: object) -> str | None:
    """Why `value` is not a plain name, or None if it is one."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if PLAIN_NAME.match(value):
        return None
    if not value:
        return "it is empty"
    if "://" in value:
        return "it is a URL"
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return "it is an absolute path"
    if "/" in value or "\\" in value:
        return "it has a path separator"
    if value in (".", ".."):
        return "it names a folder relative to another"
    if len(value) > 200:
        return "it is longer than 200 characters"
    return "it has another character than letters, digits, '.', '_', '-' and '+', or starts with one"


def check_name(value: object, field: str) -> str:
    """`value` if it is a plain name; else CloobError naming the field, the value and the fix."""
    why = name_problem(value)
    if why is not None:
        raise CloobError(f"{field} {value!r} is not a plain name: {why}", FIX)
    return value  # type: ignore[return-value]


def pydantic_name(value: str) -> str:
    """For a pydantic AfterValidator: the same check, as the ValueError pydantic reports."""
    why = name_problem(value)
    if why is not None:
        raise ValueError(f"{value!r} is not a plain name: {why}; {FIX}")
    return value


def shorten(name: str, width: int) -> str:
    """`name` in at most `width` characters for a table column, cut in the middle (…): the head holds the
    recipe and method, the tail the hash and step, the parts a reader tells runs apart by."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]
