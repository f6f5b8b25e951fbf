#!/usr/bin/env python3
"""Benchmarks of s3repofs through a real mount, each figure beside a baseline measured in the same run
and beside its peers (s3fs, rclone, JuiceFS) over the same files.

Starts everything itself on 127.0.0.1 (a private PostgreSQL cluster, moto and/or s3rver), mounts a
repository and the peers, measures, unmounts and stops everything, on failure and Ctrl-C too. See
benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import figures  # noqa: E402
import harness  # noqa: E402
import peers  # noqa: E402
import targets  # noqa: E402
from figures import FIGURES, FULL, QUICK, Bench  # noqa: E402
from harness import REPO_ROOT, RssSampler, check_drop_caches, log, mounts_under, use_code  # noqa: E402
from report import failed, peer_table, table, write_json  # noqa: E402
from servers import running, start_postgres, start_s3  # noqa: E402

SERVERS = ("moto", "s3rver")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Measure s3repofs through a real FUSE mount against baselines measured in the same run "
                    "(reading the cache file directly, boto3 against the same S3 server). Starts PostgreSQL and "
                    "the S3 server(s) on 127.0.0.1 itself; needs root (FUSE, drop_caches).",
        epilog=f"Figures (for --only): {', '.join(FIGURES)}. The daemon's peak memory is always reported.")
    parser.add_argument("--server", choices=(*SERVERS, "both"), default="both",
                        help="S3 server(s) to run against (default: both)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write every figure to FILE as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and one repetition (16 MiB file, 500 listing files, 200 small files, "
                             "20 writes, 20,000 versions); about 4 minutes for both servers with the peers")
    parser.add_argument("--only", metavar="NAME,...", help="run only these figures (comma-separated)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, daemon logs)")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="sample every daemon with py-spy (pip install py-spy) into DIR/<mount>-<pid>.txt, "
                             "collapsed stacks of wall-clock time (threads waiting included)")
    parser.add_argument("--peers", metavar="NAME,...|none", default=",".join(peers.NAMES),
                        help=f"the peers measured beside s3repofs (default: {','.join(peers.NAMES)}); a peer whose "
                             "binary is missing is named and its column skipped")
    parser.add_argument("--code", metavar="DIR", type=Path, default=REPO_ROOT,
                        help="measure the s3repofs package in DIR, e.g. a snapshot made with "
                             "`git archive HEAD s3repofs | tar -x -C DIR` (default: this work tree)")
    args = parser.parse_args(argv)
    args.figures = list(FIGURES)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in FIGURES]
        if unknown:
            parser.error(f"unknown figure {unknown[0]!r} (choose from {', '.join(FIGURES)})")
        args.figures = [name for name in FIGURES if name in wanted]
    args.servers = list(SERVERS) if args.server == "both" else [args.server]
    try:
        args.peers = peers.parse_names(args.peers)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run_server(kind: str, pg, base: Path, args: argparse.Namespace, drop_reason: str | None) -> Bench:
    """Every chosen figure against one S3 server; the server is stopped and nothing stays mounted."""
    sizes = QUICK if args.quick else FULL
    work = base / kind
    work.mkdir()
    log(f"[{kind}] starting the S3 server")
    with running(start_s3(kind, work / "s3")) as s3:
        sampler = RssSampler().start()
        b = Bench(kind, s3, pg, work, sizes, sampler, drop_reason, peer_names=args.available_peers)
        try:
            sampler.phase = "set-up"
            figures.prepare(b, args.figures)
            for name in args.figures:
                number, figure = FIGURES[name]
                log(f"[{kind}] figure {number}: {name}")
                sampler.phase = f"figure {number} ({name})"
                run_figure(b, number, name, figure)
        except Exception as exc:  # noqa: BLE001 - the other server may still work
            log(f"  ! set-up failed: {exc}\n{traceback.format_exc(limit=6)}")
            b.add(failed(kind, "0", "set-up (failed)", "", f"error: {exc}"))
        finally:
            for mount in [*b.mounts, *b.peers]:
                mount.cleanup()
            sampler.stop()
        b.results.append(figures.memory(b))
        report_daemon_logs(b)
    return b


def run_figure(b: Bench, number: str, name: str, figure) -> None:
    """One figure; an error becomes an n/a row (with the daemon's last log lines on stderr)."""
    try:
        if b.mount.pid is None or not os.path.ismount(b.mount.mountpoint):  # dead daemon: ENOTCONN
            b.mount.cleanup()  # a previous figure left it unmounted or broken
            b.mount.mount()
        figure(b)
    except Exception as exc:  # noqa: BLE001 - one figure's failure must not stop the others
        log(f"  ! figure {number} ({name}) failed: {exc}")
        log("".join(traceback.format_exc(limit=6)))
        for mount in b.mounts:
            for record in mount.log_problems()[0][-3:]:
                log(f"    daemon log ({mount.log_path.name}): {record}")
        b.add(failed(b.server, number, f"{name} (failed)", "", f"error: {exc}"))


def report_daemon_logs(b: Bench) -> None:
    """Errors in the daemons' logs are findings too: on stderr, and counted in a note."""
    for mount in b.mounts:
        errors, warnings = mount.log_problems()
        if errors or warnings:
            log(f"[{b.server}] daemon log {mount.log_path.name}: {len(errors)} error(s), {warnings} warning(s)")
            b.notes.append(f"daemon log {mount.log_path.name}: {len(errors)} error(s), {warnings} warning(s)")
        for record in errors[-5:]:
            log("    " + record.replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_code(args.code)
    if args.profile:
        if shutil.which("py-spy") is None:
            print("benchmarks/run.py: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return 2
        args.profile.mkdir(parents=True, exist_ok=True)
        harness.PROFILE_DIR = args.profile.resolve()
    if os.geteuid() != 0:
        print("benchmarks/run.py: run as root (FUSE mounts, drop_caches, read_ahead_kb)", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")  # unwinds through every finally: unmount, stop servers

    signal.signal(signal.SIGTERM, on_sigterm)
    absent = peers.missing(args.peers)
    for name, why in absent.items():
        log(f"peer {name} is missing: {why}; its column is skipped")
    args.available_peers = [name for name in args.peers if name not in absent]
    peer_versions = {name: peers.version(name) for name in args.available_peers}
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="s3repofs-bench-"))
    benches: list[Bench] = []
    try:
        drop_reason = check_drop_caches(base)
        if drop_reason:
            log(f"page cache: {drop_reason}; figures after drop_caches are n/a")
        log("starting PostgreSQL")
        pg = start_postgres(base / "postgres")
        try:
            for kind in args.servers:
                benches.append(run_server(kind, pg, base, args, drop_reason))
        finally:
            pg.stop()
    except KeyboardInterrupt:
        log("interrupted: everything was unmounted and stopped")
        return 130
    finally:
        left = mounts_under(base)
        if args.keep or left:
            log(f"kept {base}" + (f": still mounted there: {', '.join(left)}" if left else ""))
        else:
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.perf_counter() - started
    checks = {b.server: targets.evaluate(b.results) for b in benches}
    print_tables(benches, args, elapsed, checks, absent)
    if args.json:
        write_json(args.json, [r for b in benches for r in b.results], {
            "quick": args.quick, "servers": args.servers, "figures": args.figures, "seconds": round(elapsed, 1),
            "repetitions": (QUICK if args.quick else FULL).reps, "host": platform.node(), "cpus": os.cpu_count(),
            "drop_caches": drop_reason or "works", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "s3repofs": code_version(args.code), "notes": {b.server: b.notes for b in benches},
            "peers": peer_versions, "peers_missing": absent},
            [{"server": server, **c.as_json()} for server, found in checks.items() for c in found])
        log(f"wrote {args.json}")
    return 0


def code_version(code: Path) -> str:
    """The code measured: this work tree's commit, and whether s3repofs/ had uncommitted changes
    (it is being worked on), or the directory given with --code."""
    if code.resolve() != REPO_ROOT:
        return f"from {code}"

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes in s3repofs/" if git("status", "--porcelain", "s3repofs") else "")


def print_tables(benches: list[Bench], args: argparse.Namespace, elapsed: float,
                 checks: dict[str, list[targets.Check]], absent: dict[str, str]) -> None:
    reps = (QUICK if args.quick else FULL).reps
    for b in benches:
        quick = "quick: reduced sizes, targets are for full sizes; " if args.quick else ""
        print(f"\n== s3repofs on {b.server} ({quick}values are medians of {reps} repetition(s), column n) ==")
        print(table(b.results))
        for note in b.notes:
            print(f"  {note}")
        beside = peer_table(b.results, args.available_peers, targets.beside(checks[b.server]))
        if beside:
            print(f"\n== s3repofs beside its peers on {b.server}, and the targets of issue 16 ==")
            print(beside)
            for name, why in absent.items():
                print(f"  peer {name} missing: {why}")
            print("\n".join(["", "targets (ratios of this run):", *targets.summary(checks[b.server])]))
    print(f"\ns3repofs {code_version(args.code)}; total time {elapsed:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
