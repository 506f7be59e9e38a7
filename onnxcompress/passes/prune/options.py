"""The prune pass's options, checked before any pass runs."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Literal


@functools.lru_cache(maxsize=1)
def default_round_to() -> int:
    """16 on CPUs with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return 16 if "avx512f" in fh.read() else 8
    except OSError:
        return 8


def _parse_overrides(text: str) -> list[tuple[re.Pattern[str], float]]:
    out = []
    for item in (t.strip() for t in text.split(";")):
        if not item:
            continue
        pattern, eq, value = item.rpartition("=")
        if not eq or not pattern:
            raise ValueError(f"override '{item}' is not REGEX=RATIO")
        try:
            ratio = float(value)
            regex = re.compile(pattern)
        except (ValueError, re.error) as exc:
            raise ValueError(f"override '{item}': {exc}") from None
        if not 0 <= ratio < 1:
            raise ValueError(f"override '{item}': ratio must be in [0, 1)")
        out.append((regex, ratio))
    return out


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = field(default=0.3, metadata={"help": "fraction of each group's channels to remove"})
    criterion: Literal["auto", "l1", "l2", "bn", "act"] = field(
        default="auto", metadata={"help": "importance: auto = act with calibration data, else l1"})
    global_: bool = field(default=False, metadata={"key": "global", "help": "rank all groups together (normalized scores)"})
    overrides: str = field(default="", metadata={"help": "per-node ratios 'REGEX=RATIO;...' matched on producer names"})
    min_channels: int = field(default=8, metadata={"help": "never keep fewer channels in a group"})
    max_ratio: float = field(default=0.5, metadata={"help": "never remove more than this fraction of a group"})
    round_to: int = field(default=0, metadata={"help": "kept counts multiple of this (0 = 16 with AVX-512, else 8; 1 = off)"})
    recovery: Literal["auto", "none", "bias", "lstsq"] = field(
        default="auto", metadata={"help": "auto = lstsq with calibration data, else bias from BN statistics"})
    ridge: float = field(default=1e-2, metadata={"experimental": True, "help": "least-squares ridge toward the pruned weights, relative to the mean diagonal"})
    positions: int = field(default=256, metadata={"experimental": True, "help": "sampled output positions per image for the refit"})
    macs_ratio: float = field(default=0.0, metadata={
        "help": "if > 0: keep this fraction of the MACs (Conv, MatMul, Gemm), removing the channels with the least group-normalized importance "
                "across all groups (ratio is then ignored)"})
    sensitivity: bool = field(default=False, metadata={"experimental": True,
        "help": "with macs_ratio and calibration data: weigh each group's channels by the measured output error "
                "per MAC saved of pruning that group alone (max_ratio of it, bias-compensated)"})
    sensitivity_samples: int = field(default=8, metadata={"experimental": True, "help": "calibration samples used to measure sensitivity"})

    def check(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if not 0 <= self.max_ratio < 1:
            raise ValueError(f"max_ratio must be in [0, 1), got {self.max_ratio}")
        if self.min_channels < 1:
            raise ValueError(f"min_channels must be at least 1, got {self.min_channels}")
        if self.round_to < 0:
            raise ValueError(f"round_to must be 0 (auto), 1 (off) or more, got {self.round_to}")
        if not 0 <= self.macs_ratio < 1:
            raise ValueError(f"macs_ratio must be in [0, 1) (0 = off), got {self.macs_ratio}")
        if self.ridge < 0 or self.positions < 1:
            raise ValueError("ridge must be ≥ 0 and positions ≥ 1")
        _parse_overrides(self.overrides)
