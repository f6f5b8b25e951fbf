"""How long ``s3repofs gc`` takes to plan, with N versions on a private PostgreSQL and their objects in
a local object directory or on moto's S3 server.

    python3 benchmarks/gc_plan.py --versions 20000 [--store local|s3]

Versions are bulk-inserted (seed.py: a quarter expired, a tenth unpublished by a host gone, the rest
published), each uploaded one with a small object, plus 1 % orphan objects. Two plans are timed:
at the current time (nothing old enough: the listing and lookups alone) and 40 days later (every
expired and unpublished version is due, every orphan past its grace), beside a baseline: listing the
store alone.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from seed import FakeVersion, insert_versions  # noqa: E402
from servers import test_servers  # noqa: E402  (tests/servers.py)

from s3repofs import S3Repo  # noqa: E402
from s3repofs.ops import gc  # noqa: E402


def fake_versions(count: int) -> list[FakeVersion]:
    def state(i: int) -> str:
        return "expired" if i % 4 == 0 else "unpublished" if i % 10 == 1 else "published"

    return [FakeVersion("bench", f"d{i // 100:04d}", f"f{i:07d}", state(i), f"bench/{uuid.uuid4().hex}", 16)
            for i in range(count)]


def put_objects(repo: S3Repo, keys: list[str], source: Path) -> None:
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: repo.store.put(key, source, 16, md5, {}), keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=20_000)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        postgres = test_servers.start_postgres(work / "pg")
        s3 = test_servers.start_s3_server(work / "s3") if args.store == "s3" else None
        try:
            config = {"local_root": str(work / "root"), "host_name": "bench-gc",
                      "database": postgres.create_database("gc_bench")}
            if s3 is None:
                config["object_dir"] = str(work / "objects")
            else:
                s3.create_bucket("gc-bench")
                config.update(default_s3_bucket="gc-bench", s3_endpoint_url=s3.endpoint_url,
                              s3_access_key=s3.access_key, s3_secret_key=s3.secret_key, s3_region=s3.region)
            with S3Repo(config) as repo:
                repo.create_repository()
                versions = fake_versions(args.versions)
                insert_versions(config["database"], repo.store.bucket, versions)
                source = work / "object"
                source.write_bytes(b"x" * 16)
                orphans = [f"bench/{uuid.uuid4().hex}" for _ in range(args.versions // 100)]
                started = time.monotonic()
                put_objects(repo, [v.key for v in versions if v.state != "unpublished"] + orphans, source)
                print(f"{args.versions} versions, {args.store} store: objects written in "
                      f"{time.monotonic() - started:.1f} s")
                started = time.monotonic()
                listed = sum(1 for _ in repo.store.list())
                print(f"baseline, listing the store alone: {time.monotonic() - started:.2f} s ({listed} objects)")
                for label, now in (("now", None), ("40 days later", time.time() + 40 * 86400)):
                    started = time.monotonic()
                    plan = gc.plan(repo, now=now)
                    took = time.monotonic() - started
                    counts = ", ".join(f"{len(plan.items(c))} {c}" for c in gc.CATEGORIES)
                    print(f"plan at {label}: {took:.2f} s ({counts})")
                print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
        finally:
            if s3 is not None:
                s3.stop()
            postgres.stop()


if __name__ == "__main__":
    main()
