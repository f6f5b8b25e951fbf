"""Figures as rows: value beside its baseline, the ratio value/baseline, the target, and whether it is met.

Every ratio is ``value / baseline``. For a rate (MB/s, files/s) higher is better; for a time (s, ms)
lower is better; each target says which way it points.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
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

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value, self.ratio) if self.target else None

    def as_json(self) -> dict:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["met"] = self.met
        data["target"] = ({**asdict(self.target), "text": self.target.text(self.unit)} if self.target else None)
        return data


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


def write_json(path: Path, results: list[Result], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "figures": [r.as_json() for r in results]}, indent=2) + "\n")
