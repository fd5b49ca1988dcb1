"""Durations written the way people say them: "90s", "12m", "1h", "1h30m", "1.5h" (`spinefrac train --budget`)."""

from __future__ import annotations

import re

UNIT_SECONDS: dict[str, float] = {"h": 3600.0, "m": 60.0, "s": 1.0}
"""Seconds per unit: hours, minutes, seconds."""
SECONDS_PER_HOUR = UNIT_SECONDS["h"]
"""Ultralytics' `time` (train.time) is in hours."""
_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
EXAMPLES = "e.g. 90s, 12m, 1h or 1h30m"


def parse_duration(text: str) -> float:
    """Seconds of a duration such as "90s", "12m", "1h30m" or "1.5h"; ValueError saying what is wrong otherwise.

    Units come in the order h, m, s, each at most once; a number without a unit is refused (minutes or seconds?).
    """
    raw = str(text).strip().lower().replace(" ", "")
    parts = _PART.findall(raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        hint = " (a number needs a unit: h, m or s)" if re.fullmatch(r"\d+(\.\d+)?", raw) else ""
        raise ValueError(f"{text!r} is not a duration{hint}; {EXAMPLES}")
    units = [u for _, u in parts]
    if len(set(units)) != len(units) or units != sorted(units, key=list(UNIT_SECONDS).index):
        raise ValueError(f"{text!r}: give each unit once, in the order h, m, s; {EXAMPLES}")
    seconds = sum(float(n) * UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration; {EXAMPLES}")
    return seconds


def format_duration(seconds: float) -> str:
    """A short human form of a number of seconds: "45 s", "12.0 min", "1.50 h"."""
    if seconds < UNIT_SECONDS["m"]:
        return f"{seconds:.0f} s"
    if seconds < UNIT_SECONDS["h"]:
        return f"{seconds / UNIT_SECONDS['m']:.1f} min"
    return f"{seconds / UNIT_SECONDS['h']:.2f} h"
