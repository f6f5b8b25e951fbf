"""Figures as rows: value beside its baseline, the ratio value/baseline, the target, and whether it is met;
and beside the peers: each peer's value, the best of them, and s3repofs against that best.

Every ratio is ``value / baseline``. For a rate (MB/s, files/s) higher is better; for a time (s, ms)
or a size (MB) lower is better; each target says which way it points.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    on: str  # "ratio" or "value"
    op: str  # ">=" or "<="
    threshold: float

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x >= self.threshold if self.op == ">=" else x <= self.threshold

    def text(self, unit: str) -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {self.threshold:g}"
        return f"{self.op} {self.threshold:g} {unit}"


@dataclass
class Result:
    server: str
    figure: str  # short id: "1a", "2c", ...
    name: str  # what is measured
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""  # what the baseline is
    target: Target | None = None
    reps: int = 1  # the value (and baseline) is the median of this many repetitions
    note: str = ""  # n/a reason, error, or a remark
    peers: dict[str, float | None] = field(default_factory=dict)  # peer -> its value (None: it failed)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value, self.ratio) if self.target else None

    @property
    def lower_is_better(self) -> bool:
        return self.unit in LOWER_IS_BETTER

    @property
    def best_peer(self) -> tuple[str, float] | None:
        """The peer with the best value (the highest rate, the lowest time), or None if none has one;
        of equal values, the first peer's."""
        measured = [(name, v) for name, v in self.peers.items() if v is not None and not math.isnan(v)]
        if not measured:
            return None
        pick = min if self.lower_is_better else max
        return pick(measured, key=lambda item: item[1])

    @property
    def versus_best_peer(self) -> float | None:
        """s3repofs against its best peer, >= 1 when s3repofs is as good or better: value / best for a
        rate, best / value for a time."""
        best = self.best_peer
        if best is None or self.value is None or not self.value or not best[1]:
            return None
        return best[1] / self.value if self.lower_is_better else self.value / best[1]

    def as_json(self) -> dict:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["met"] = self.met
        best = self.best_peer
        data["best_peer"] = {"name": best[0], "value": best[1]} if best else None
        data["versus_best_peer"] = self.versus_best_peer
        data["target"] = ({**asdict(self.target), "text": self.target.text(self.unit)} if self.target else None)
        return data


LOWER_IS_BETTER = {"s", "ms", "MB"}


def failed(server: str, figure: str, name: str, unit: str, why: str, target: Target | None = None) -> Result:
    """A figure that could not be measured (n/a), with the reason."""
    return Result(server, figure, name, None, unit, target=target, reps=0, note=why)


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _num3(x: float | None) -> str:
    """Three significant digits (thousands grouped): peers close to each other stay apart."""
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(results: list[Result]) -> str:
    """A plain-text table, one line per figure, notes below it."""
    header = ("fig", "figure", "value", "unit", "baseline", "ratio", "target", "met", "n")
    rows = []
    for r in results:
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        rows.append((r.figure, r.name, _num(r.value), r.unit, _num(r.baseline),
                     _num(r.ratio) if r.ratio is not None else "-",
                     r.target.text(r.unit) if r.target else "report", met, str(r.reps)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    right = {2, 4, 5, 8}
    lines = []
    for row in (header, *rows):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    baselines = [f"  {r.figure}: baseline = {r.baseline_name}" for r in results if r.baseline_name]
    notes = [f"  {r.figure}: {r.note}" for r in results if r.note]
    if baselines:
        lines += ["", "baselines:", *baselines]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def peer_table(results: list[Result], peers: list[str], remarks: dict[str, str]) -> str:
    """The figures measured beside the peers (or judged by a target in ``remarks``): the baseline, each
    peer's value, the best peer, s3repofs, s3repofs against the best peer (>= 1: as good or better),
    and the remark (the issue's targets for that figure)."""
    header = ("fig", "figure", "unit", "baseline", *peers, "best peer", "s3repofs", "vs best", "targets")
    rows = []
    for r in results:
        if not r.peers and r.figure not in remarks:
            continue
        best = r.best_peer
        rows.append((r.figure, r.name, r.unit, _num3(r.baseline), *(_num3(r.peers.get(name)) for name in peers),
                     f"{best[0]} {_num3(best[1])}" if best else "-", _num3(r.value),
                     _num(r.versus_best_peer) if r.versus_best_peer is not None else "-", remarks.get(r.figure, "")))
    if not rows:
        return ""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    left = {0, 1, 2, len(header) - 1}
    lines = []
    for row in (header, *rows):
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def write_json(path: Path, results: list[Result], meta: dict, targets: list[dict] | None = None) -> None:
    """``{"meta", "figures", "targets"}``: every row (with its peers), and every target check."""
    path.write_text(json.dumps({"meta": meta, "figures": [r.as_json() for r in results], "targets": targets or []},
                               indent=2) + "\n")
