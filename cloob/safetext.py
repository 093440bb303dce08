"""Text from an input (a file's bytes, a column name, a parser's complaint quoting a line) made safe to
put into a message for a terminal: non-printable characters escaped, long values cut.

A junk file otherwise reaches the terminal as raw bytes: BEL rings, SI switches the character set,
ESC sequences move the cursor or retitle the window, and a 300 KB line buries the message.
"""

from __future__ import annotations

LIMIT = 200  # characters of one value shown in a message


def _escape(ch: str) -> str:
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe_text(value: object, limit: int = LIMIT) -> str:
    """`value` as printable text: str(value), bytes decoded (undecodable bytes as \\xNN), every
    character that str.isprintable() rejects (control characters, ESC, bidi overrides, line breaks,
    U+2028 ...) written as an escape, and cut after `limit` characters with a note of how much more
    there was."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", errors="backslashreplace")
    else:
        text = str(value)
    cut = len(text) > limit
    head = text[:limit] if cut else text
    out = "".join(ch if ch.isprintable() else _escape(ch) for ch in head)
    if cut:
        out += f"... ({len(text) - limit} more characters)"
    return out


def safe_lines(text: str, limit: int = LIMIT) -> list[str]:
    """Each line of a multi-line text (a log's tail) made safe on its own; the line breaks are kept."""
    return [safe_text(line, limit) for line in text.splitlines()]
