"""Wall speedup, one definition for the bench and the runtime report.

Entries are timed in interleaved rounds (round r runs the reference and every entry once), and
an entry's wall speedup is the median over rounds of (reference seconds / entry seconds) IN THE
SAME ROUND: the two ran within moments of each other, so a change of load from other processes
between rounds cancels out, and one slow round cannot move the median.
"""
from __future__ import annotations

import statistics


def wall_speedup(reference_rounds: list[float], rounds: list[float]) -> float:
    """Median over rounds of reference / entry seconds (the lists are aligned by round)."""
    if len(reference_rounds) != len(rounds) or not rounds:
        raise ValueError("wall_speedup needs the same number (> 0) of reference and entry rounds")
    return float(statistics.median(r / t for r, t in zip(reference_rounds, rounds)))
