#!/usr/bin/env python3
"""The operator commands at scale: backup, restore, fsck, rebuild and gc's planning, each timed with
its peak memory, on repositories of 100,000 and 1,000,000 versions (``--versions``).

Each command runs as an operator runs it (``python -m s3repofs CMD --json``), in its own process, so
its peak RSS is its own (VmHWM, read by the process itself: ``ru_maxrss`` survives execve on Linux, so a
child would report this seeding process's peak): flat in the number of versions is the target.
Versions are bulk-inserted into a private PostgreSQL (benchmarks/seed.py, the lived-in mix: ~70 %
expired, ~25 % published, ~1 % staged), and every uploaded version gets a small object (64 bytes)
carrying its self-description, in a local object directory (``--store local``, default: a million
objects on moto take an hour to write) or on moto (``--store moto``). fsck reads sizes (HEAD), not
contents, so objects hold zeros.

``find`` by tag is timed on the same versions, tagged in SQL: every version has ``batch`` (its id mod
1,000), one in ten ``common``, one in 10,000 ``rare``; ``--only-find`` skips the objects and the other
commands (find reads no object).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import seed  # noqa: E402
from harness import log  # noqa: E402
from servers import running, start_moto, start_postgres  # noqa: E402

OBJECT_SIZE = 64
TYPE = "ops"


@dataclass
class Figure:
    versions: int
    store: str
    command: str
    seconds: float
    peak_rss_mb: float
    detail: str = ""

    def row(self) -> str:
        return (f"| {self.versions:>9,} | {self.store:<5} | {self.command:<28} | {self.seconds:>8.1f} | "
                f"{self.peak_rss_mb:>6.0f} | {self.detail} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/ops.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default="100000,1000000",
                        help="comma-separated repository sizes (default: 100000,1000000)")
    parser.add_argument("--store", choices=("local", "moto"), default="local", help="where the objects live")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--only-find", action="store_true", help="time find only (no objects are written)")
    return parser.parse_args()


# Runs the command's main() and then records the process's own peak RSS (VmHWM, kB) in the file named first.
_MEASURED = """import re, sys
from s3repofs.cli import main
record, sys.argv = sys.argv[1], ["s3repofs", *sys.argv[2:]]
try:
    status = main()
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(record, "w").write(peak)
    open(record, "w").write(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))
sys.exit(status)
"""


def run_command(*args: str, config: Path, ok=(0,)) -> tuple[float, float, dict | list | None]:
    """Run ``s3repofs ARGS --config CONFIG``: (seconds, its peak RSS in MB, its JSON output if any)."""
    with tempfile.NamedTemporaryFile() as record:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", _MEASURED, record.name, *args, "--config", str(config)],
                                capture_output=True, env=harness.s3repofs_env(), cwd="/")
        seconds = time.monotonic() - started
        peak_mb = int(Path(record.name).read_text() or 0) / 1024
    if result.returncode not in ok:
        raise RuntimeError(f"s3repofs {' '.join(args)} failed ({result.returncode}): {result.stderr.decode().strip()}")
    try:
        output = json.loads(result.stdout) if result.stdout.strip() else None
    except json.JSONDecodeError:
        output = None
    return seconds, peak_mb, output


def seed_repository(pg, s3, work: Path, versions: int, store: str, objects: bool = True) -> tuple[Path, str]:
    """A repository of ``versions`` versions and their objects; its config file and database URL."""
    url = pg.create_database(f"ops_{versions}_{store}")
    config = {"local_root": str(work / "root"), "database": url, "host_name": "bench-ops"}
    if store == "moto":
        bucket = f"ops-{versions}"
        s3.create_bucket(bucket)
        config.update(default_s3_bucket=bucket, s3_endpoint_url=s3.endpoint_url, s3_access_key=s3.access_key,
                      s3_secret_key=s3.secret_key, s3_region=s3.region)
    else:
        config["object_dir"] = str(work / "objects")
        bucket = "local"
    config_path = harness.write_config(work / "s3repo.json", config)
    harness.s3repofs("init", "--config", str(config_path))
    took, _ = harness.timed(lambda: seed.insert_versions(url, bucket, _small(seed.filler(0, versions, TYPE))))
    log(f"[{versions:,}] {versions:,} rows in {took:.0f} s")
    took, _ = harness.timed(lambda: _tag_versions(url))
    log(f"[{versions:,}] tags in {took:.0f} s")
    if objects:
        took, written = harness.timed(lambda: _write_objects(url, config, store, s3))
        log(f"[{versions:,}] {written:,} objects in {took:.0f} s")
    return config_path, url


def _tag_versions(url: str) -> None:
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            insert = "INSERT INTO tags (version_id, key, value) SELECT id"
            cur.execute(f"{insert}, 'batch', (id % 1000)::text FROM versions")
            cur.execute(f"{insert}, 'common', '' FROM versions WHERE id % 10 = 0")
            cur.execute(f"{insert}, 'rare', '' FROM versions WHERE id % 10000 = 0")
            cur.execute("ANALYZE tags")
    finally:
        conn.close()


# find's arguments, and what each shows: a rare tag, a tag of 1 version in 1,000, two tags, any of two, a tag
# but not another, a tag and a day (date tags are a range of created_at; the seeded versions share one day).
FIND_QUERIES = [  # (the published versions are those with ids divisible by 4)
    ("--tag", "rare"), ("--tag", "batch=8"), ("--tag", "common", "--tag", "batch=500"),
    ("--any-tag", "rare", "--any-tag", "batch=8"), ("--tag", "batch=8", "--no-tag", "common"),
    ("--tag", "rare", "--day", time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))),
]


def measure_find(config: Path, versions: int, store: str) -> list[Figure]:
    """Each query as a command (a process: its start is most of it) and its query alone (in this process)."""
    figures = []
    for args in FIND_QUERIES:
        seconds, peak, found = run_command("find", *args, "--json", config=config)
        query = _query_seconds(config, args)
        figures.append(Figure(versions, store, "find " + " ".join(args), seconds, peak,
                              f"{len(found):,} published versions; the query alone {query * 1000:.0f} ms"))
    return figures


def _query_seconds(config: Path, args: tuple[str, ...]) -> float:
    """The best of three runs of find's query in this process (the repository opened once)."""
    from s3repofs import S3Repo
    from s3repofs.cli.main import build_parser
    from s3repofs.cli.tags import _tags
    from s3repofs.domain.tags import DATE_PERIODS

    parsed = build_parser().parse_args(["find", *args])
    date = next(((p, getattr(parsed, p)) for p in DATE_PERIODS if getattr(parsed, p)), None)
    with S3Repo(str(config)) as repo:
        best = float("inf")
        for _ in range(3):
            took, _found = harness.timed(lambda: list(repo.find(
                tags_all=_tags(parsed.tag), tags_any=_tags(parsed.any_tag), tags_none=_tags(parsed.no_tag),
                date=date)))
            best = min(best, took)
    return best


def _small(versions):
    for v in versions:
        yield seed.FakeVersion(v.file_type, v.dir, v.name, v.state, v.key, OBJECT_SIZE)


def _write_objects(url: str, config: dict, store: str, s3) -> int:
    import psycopg2

    conn = psycopg2.connect(url)
    written = 0
    try:
        with conn.cursor(name="objects") as cur, ThreadPoolExecutor(32 if store == "moto" else 4) as pool:
            cur.itersize = 10_000
            cur.execute("""SELECT id, file_type, dir, name, s3_key, size, md5, origin_host, created_at, mode, uid, gid
                           FROM versions WHERE storage = 'uploaded'""")
            put = _local_put(Path(config["object_dir"])) if store == "local" else _moto_put(s3, config)
            while rows := cur.fetchmany(10_000):
                written += sum(pool.map(put, rows))
    finally:
        conn.close()
    return written


def _description(row) -> dict[str, str]:
    version_id, file_type, dir, name, _key, size, md5, host, created, mode, uid, gid = row
    path = "/".join(part for part in (file_type, dir, name) if part)
    values = {"path": path, "type": file_type, "version": str(version_id), "md5": md5, "size": str(size),
              "origin-host": host, "created": repr(created), "mode": str(mode), "uid": str(uid), "gid": str(gid)}
    return {k: quote(v, safe="/") for k, v in values.items()}


def _local_put(root: Path):
    zeros = bytes(OBJECT_SIZE)

    def put(row) -> int:
        key = row[4]
        data, meta = root / "data" / key, root / "meta" / (key + ".json")
        data.parent.mkdir(parents=True, exist_ok=True)
        meta.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(zeros[:row[5]])
        meta.write_text(json.dumps(_description(row)))
        return 1

    return put


def _moto_put(s3, config: dict):
    client = s3.client()
    zeros = bytes(OBJECT_SIZE)

    def put(row) -> int:
        metadata = {"s3repo-" + k: v for k, v in _description(row).items()}
        client.put_object(Bucket=config["default_s3_bucket"], Key=row[4], Body=zeros[:row[5]], Metadata=metadata)
        return 1

    return put


def measure(pg, config: Path, versions: int, store: str) -> list[Figure]:
    figures = []
    rebuilt = pg.create_database(f"ops_rebuilt_{versions}_{store}")
    seconds, peak, report = run_command("rebuild", "--to", rebuilt, "--json", config=config)
    figures.append(Figure(versions, store, "rebuild", seconds, peak,
                          f"{report['versions']:,} versions from {report['objects']:,} objects"))
    seconds, peak, report = run_command("backup", "--json", config=config)
    figures.append(Figure(versions, store, "backup", seconds, peak,
                          f"{report['size'] / 2**20:.1f} MiB gzipped, {sum(report['rows'].values()):,} rows"))
    restored = pg.create_database(f"ops_restored_{versions}_{store}")
    seconds, peak, report = run_command("restore", "--to", restored, "--json", config=config)
    figures.append(Figure(versions, store, "restore", seconds, peak, f"{report['rows']['versions']:,} versions"))
    seconds, peak, report = run_command("gc", "--dry-run", "--json", config=config)
    due = sum(category["count"] for category in report["plan"]["categories"].values())
    figures.append(Figure(versions, store, "gc planning (--dry-run)", seconds, peak, f"{due:,} items due"))
    # HEAD only: the seeded objects hold zeros, not the bytes their md5s describe. The staged versions of the
    # seeder (never a recorded host) are findings, so the exit status is 8.
    seconds, peak, report = run_command("fsck", "--json", config=config, ok=(0, 8))
    figures.append(Figure(versions, store, "fsck", seconds, peak,
                          f"{report['versions']:,} versions, {report['objects']:,} objects, {report['counts']}"))
    return figures


def main() -> int:
    args = parse_args()
    sizes = [int(n) for n in args.versions.split(",")]
    base = Path(tempfile.mkdtemp(prefix="s3repofs-ops-"))
    figures: list[Figure] = []
    try:
        with running(start_postgres(base / "pg")) as pg, \
                running(start_moto(base / "s3") if args.store == "moto" else _NoServer()) as s3:
            for versions in sizes:
                work = base / f"n{versions}"
                work.mkdir()
                config, _url = seed_repository(pg, s3, work, versions, args.store, objects=not args.only_find)
                if not args.only_find:
                    figures += measure(pg, config, versions, args.store)
                figures += measure_find(config, versions, args.store)
                for figure in figures[-10:]:
                    log(figure.row())
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(base)], check=False)
    print("| versions | store | command | seconds | peak RSS MB | detail |")
    print("| ---: | --- | --- | ---: | ---: | --- |")
    for figure in figures:
        print(figure.row())
    if args.json:
        args.json.write_text(json.dumps([f.__dict__ for f in figures], indent=2))
    return 0


class _NoServer:
    def stop(self) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
