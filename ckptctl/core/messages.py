"""Other libraries' error text made fit to show: no terminal escapes, one line, the cause kept whole. Pure.

torch's ``weights_only`` refusal is several lines of advice, part of it bold (ANSI escapes),
with the one sentence a user needs (``Unsupported global: GLOBAL numpy._core.multiarray.scalar
was not an allowed global by default``) on its fourth line. :func:`load_failure_cause` keeps
that sentence; :func:`one_line` is what every ``Error:`` line and verify detail goes through.
"""

from __future__ import annotations

import re
import textwrap

#: ANSI escape sequences: CSI (``ESC [ … final``, colours and cursor moves), OSC (``ESC ] … BEL``) and two-byte escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
#: Where torch's weights_only unpickler says what it refused (torch 2.4 to 2.13).
_UNPICKLER_CAUSE = re.compile(r"WeightsUnpickler error:\s*(.+)")
#: The longest cause kept; longer text is cut at a word boundary, never inside a name.
MAX_CAUSE_CHARS = 400


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (any that is left over, a lone ESC, goes too)."""
    return _ANSI.sub("", text).replace("\x1b", "")


def one_line(text: str) -> str:
    """``text`` without escapes, its whitespace (newlines, tabs) collapsed to single spaces."""
    return " ".join(strip_ansi(text).split())


def shorten(text: str, limit: int = MAX_CAUSE_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters at a word boundary (``…`` marks the cut)."""
    flat = one_line(text)
    if len(flat) <= limit:
        return flat
    return textwrap.shorten(flat, width=limit, placeholder=" …")


def load_failure_cause(text: str) -> str:
    """The sentence of a ``torch.load`` error that says why it failed, on one line without escapes.

    For a ``weights_only`` refusal that is what the unpickler refused (``Unsupported global:
    GLOBAL numpy._core.multiarray.scalar was not an allowed global by default``), without
    torch's advice around it; for anything else, the first line of the message.
    """
    plain = strip_ansi(text)
    found = _UNPICKLER_CAUSE.search(plain)
    if found:
        cause = found.group(1).strip()
        # its first sentence; names have dots but no ". " inside them
        cause = cause.split(". ", 1)[0].rstrip(".")
    else:
        lines = [line for line in plain.strip().splitlines() if line.strip()]
        cause = lines[0] if lines else ""
    return shorten(cause)
