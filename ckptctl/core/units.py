"""Parsing sizes typed by people (``15GB``, ``500MiB``, ``1e9``). Pure: no IO."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Return the number of bytes in ``text``: ``15GB`` (decimal, as Drive quotas are sold), ``2GiB`` (binary), ``1048576``.

    Raises ValueError for anything else, including negative sizes.
    """
    match = _SIZE.match(text or "")
    if not match:
        raise ValueError(f"not a size: {text!r} (try 15GB, 500MB or 2GiB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)")
    return int(float(number) * factor)
