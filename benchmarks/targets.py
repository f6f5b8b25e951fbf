"""The targets of issue 16 ("Fast II"), each judged from one run's figures on one server as a ratio
computed in that run: pass or falls short.

1. Every figure of the issue's table (and the parallel work of target 6) at least as good as the best
   peer: value / best for a rate, best / value for a time (``Result.versus_best_peer``) >= 1.
2. Cold large read >= 0.95 x boto3's download_file into a local file: 2e's ratio.
3. First byte of a large cold file <= 1.2 x boto3's own 256 MiB / 4 KiB first-byte ratio:
   2c's ratio / 2d's ratio.
4. Durable small writes >= the best durable peer (5a against its best peer) and >= 0.6 x boto3's
   sequential PUT rate (5a's ratio).
5. Large writes >= the best peer: 5b against its best peer.
6. Parallel work >= 1.0 x boto3 with 8 threads doing the same GETs / PUTs: 8a's and 8b's ratios.
7. Kept: warm >= 0.6 x page cache (1a's ratio); 1,000,000 versions <= 1.05 x 10,000 (6c's and 6d's
   ratios); the daemon's peak RSS <= 150 MB through all figures (7: value / 150 MB <= 1).

A check whose figures did not run (``--only``), or that compares with peers none of which ran
(``--peers none``), is left out; one whose figure ran but has no number is n/a.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from report import Result, _num

TARGETS = {
    1: "every figure >= the best peer",
    2: "cold large read >= 0.95 x boto3 download_file to a file",
    3: "first byte of a large cold file <= 1.2 x boto3's own first-byte ratio",
    4: "durable small writes >= the best durable peer and >= 0.6 x boto3 PUT",
    5: "large writes >= the best peer",
    6: "parallel work >= 1.0 x boto3 with 8 threads",
    7: "kept: warm >= 0.6 x page cache, 10^6 versions <= 1.05 x 10^4, peak RSS <= 150 MB",
}
RSS_LIMIT_MB = 150
# The figures of the table (ls -l 10k cold and warm, stat 1,000 cold, 256 MiB cold and warm,
# 2,000 x 4 KiB cold and warm, the two durable writes) and of the parallel work it added.
BESIDE_PEERS = ("3a", "3b", "3c", "2a", "1a", "4a", "4b", "5a", "5b", "8a", "8b")


@dataclass(frozen=True)
class Check:
    """One comparison of one figure against one of the issue's targets."""

    target: int  # its number in the issue
    figure: str
    label: str  # against what, in a word or two, for the column beside the figure
    what: str  # the ratio, in words
    ratio: float | None
    op: str  # ">=" or "<="
    threshold: float

    @property
    def passed(self) -> bool | None:
        if self.ratio is None or math.isnan(self.ratio):
            return None
        return self.ratio >= self.threshold if self.op == ">=" else self.ratio <= self.threshold

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "falls short", None: "n/a"}[self.passed]

    def text(self) -> str:
        """``0.68 (need >= 1) falls short``."""
        return f"{_num(self.ratio)} (need {self.op} {self.threshold:g}) {self.verdict}"

    def as_json(self) -> dict:
        return {**asdict(self), "passed": self.passed, "verdict": self.verdict}


def evaluate(results: list[Result]) -> list[Check]:
    """Every check the figures of one server allow, in the order of the targets."""
    by_figure = {r.figure: r for r in results}
    checks: list[Check] = []

    def add(target: int, figure: str, label: str, what: str, ratio: float | None, op: str,
            threshold: float) -> None:
        checks.append(Check(target, figure, label, what, ratio, op, threshold))

    for r in results:
        if r.figure in BESIDE_PEERS and r.peers:
            best = r.best_peer
            add(1, r.figure, "peer", f"against the best peer ({best[0] if best else 'none measured'})",
                r.versus_best_peer, ">=", 1.0)
    if "2e" in by_figure:
        add(2, "2e", "download", "cold read / boto3 download_file to a file", by_figure["2e"].ratio, ">=", 0.95)
    if "2c" in by_figure and "2d" in by_figure:
        add(3, "2c", "boto3", "first-byte ratio (large / small) / boto3's", _quotient(by_figure["2c"].ratio,
                                                                                    by_figure["2d"].ratio), "<=", 1.2)
    if "5a" in by_figure:
        small = by_figure["5a"]
        if small.peers:
            add(4, "5a", "peer", "against the best durable peer", small.versus_best_peer, ">=", 1.0)
        add(4, "5a", "PUT", "against boto3's sequential PUT", small.ratio, ">=", 0.6)
    if "5b" in by_figure and by_figure["5b"].peers:
        add(5, "5b", "peer", "against the best peer", by_figure["5b"].versus_best_peer, ">=", 1.0)
    for figure in ("8a", "8b"):
        if figure in by_figure:
            add(6, figure, "boto3", "against boto3 with 8 threads", by_figure[figure].ratio, ">=", 1.0)
    if "1a" in by_figure:
        add(7, "1a", "page cache", "warm read / page cache", by_figure["1a"].ratio, ">=", 0.6)
    for figure in ("6c", "6d"):
        if figure in by_figure:
            add(7, figure, "versions", "many versions / few", by_figure[figure].ratio, "<=", 1.05)
    if "7" in by_figure:
        value = by_figure["7"].value
        add(7, "7", "RSS", f"peak RSS / {RSS_LIMIT_MB} MB", None if value is None else value / RSS_LIMIT_MB,
            "<=", 1.0)
    return sorted(checks, key=lambda c: c.target)


def _quotient(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def beside(checks: list[Check]) -> dict[str, str]:
    """Per figure, its checks in a few words, for the column beside the peers: ``1 peer: 0.68 falls short``."""
    texts: dict[str, list[str]] = {}
    for c in checks:
        texts.setdefault(c.figure, []).append(f"{c.target} {c.label}: {_num(c.ratio)} {c.verdict}")
    return {figure: "; ".join(parts) for figure, parts in texts.items()}


def summary(checks: list[Check]) -> list[str]:
    """One line per target: pass, or where it falls short and by how much (or what is n/a)."""
    lines = []
    for number, text in TARGETS.items():
        mine = [c for c in checks if c.target == number]
        if not mine:
            continue
        short = [c for c in mine if c.passed is False]
        unknown = [c for c in mine if c.passed is None]
        if short:
            verdict = "falls short: " + ", ".join(f"{c.figure} {c.what} {_num(c.ratio)} (need {c.op} "
                                                  f"{c.threshold:g})" for c in short)
        elif unknown:
            verdict = "n/a: " + ", ".join(f"{c.figure} {c.what}" for c in unknown)
        else:
            verdict = "pass"
        lines.append(f"  target {number} ({text}): {verdict}")
    return lines
