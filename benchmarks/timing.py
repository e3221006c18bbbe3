"""Timing in interleaved rounds: medians and paired ratios measured in the same run."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Samples:
    """Seconds per round for each variant of one comparison (round ``i`` of every variant ran
    back to back, so their ratio is a fair pair)."""

    seconds: Mapping[str, list[float]]

    def ms(self, *variants: str) -> dict[str, list[float]]:
        """The samples of ``variants`` in milliseconds, rounded to the microsecond."""
        return {name: [round(s * 1e3, 3) for s in self.seconds[name]] for name in variants}

    def median_ms(self, variant: str) -> float:
        """The median time of ``variant`` in milliseconds."""
        return statistics.median(self.seconds[variant]) * 1e3

    def speedup(self, ours: str, baseline: str) -> float:
        """Median over rounds of ``baseline / ours``: > 1 means ours is faster."""
        pairs = zip(self.seconds[baseline], self.seconds[ours], strict=True)
        return statistics.median(b / o for b, o in pairs)

    def difference_ms(self, ours: str, baseline: str) -> float:
        """Median over rounds of ``ours - baseline`` in milliseconds."""
        pairs = zip(self.seconds[ours], self.seconds[baseline], strict=True)
        return statistics.median(o - b for o, b in pairs) * 1e3


def run_rounds(
    variants: Mapping[str, Callable[[], object]],
    *,
    repeat: int,
    warmup: int = 1,
    cleanup: Callable[[], None] | None = None,
) -> Samples:
    """Time every variant once per round (see :func:`measure_rounds`).

    The garbage collector runs before each call and is off during it; what a call returns is
    dropped, and ``cleanup`` runs, outside the timing.
    """

    def timed(variant: Callable[[], object]) -> Callable[[], float]:
        def measure() -> float:
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                result = variant()
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            del result
            if cleanup is not None:
                cleanup()
            return elapsed

        return measure

    return measure_rounds(
        {name: timed(variant) for name, variant in variants.items()},
        repeat=repeat,
        warmup=warmup,
    )


def measure_rounds(
    measures: Mapping[str, Callable[[], float]], *, repeat: int, warmup: int = 1
) -> Samples:
    """Call every measure once per round, ``warmup`` unrecorded rounds first; each returns
    seconds. The order rotates from round to round so that no variant always runs first (or
    right after a given other one)."""
    names = list(measures)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeat):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            value = measures[name]()
            if round_ >= warmup:
                seconds[name].append(value)
    return Samples(seconds)
