"""Progress reports: a log line per tenth when stderr is not a terminal, nothing when quiet."""

import logging

from s3repofs.ops.progress import progress


def test_a_log_line_per_tenth_and_one_at_the_end(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("fsck", 200, unit="objects") as report:
        for _ in range(200):
            report.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:9] == [f"fsck: {p} % ({p * 2} of 200 objects)" for p in range(10, 100, 10)]
    assert len(lines) == 10 and lines[-1].startswith("fsck: done, 200 objects in ")


def test_an_unknown_total_reports_every_ten_thousand_steps(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("listing", None, unit="keys") as report:
        report.advance(25_000)
        report.advance(1)
    assert [r.getMessage() for r in caplog.records][:1] == ["listing: 25000 keys so far"]


def test_quiet_reports_nothing(caplog):
    caplog.set_level(logging.INFO, "s3repofs.progress")
    with progress("gc", 10, quiet=True) as report:
        report.advance(10)
    assert caplog.records == []
