"""The ``s3repofs`` command: one subcommand per operator task, each with ``--help``.

Errors print one line, ``s3repofs: <what went wrong>: <why>``, and exit with the error's status
(2 for bad configuration or arguments); never a traceback unless ``--debug`` asks for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from .. import __version__
from ..config import load_config
from ..domain.lifecycle import VISIBLE_STATES, State, Storage, Tier
from ..errors import NotFoundError, RepoError, UsageError
from ..local.intake import check_source
from ..ops import backup as backup_ops
from ..ops import cache as cache_ops
from ..ops import copy as copy_ops
from ..ops import fsck as fsck_ops
from ..ops import gc as gc_ops
from ..ops import rebuild as rebuild_ops
from ..ops import status as status_ops
from ..ops.holders import describe, seen
from ..repo import RepoFile, S3Repo

log = logging.getLogger("s3repofs")

STATE_CHOICES = (*(state.value for state in VISIBLE_STATES), "all")  # values: argparse's messages show their repr
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3repofs",
        description="A distributed file repository on S3 and SQL, with a publish/expire lifecycle.",
        epilog="Configuration: --config FILE, else $S3REPO_CONFIG or $S3CACHE_CONFIG, else the embedded "
               "default repository under $XDG_DATA_HOME/s3repofs (~/.local/share/s3repofs).")
    parser.add_argument("--version", action="version", version=f"s3repofs {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE|NAME",
                        help="configuration file (JSON), or the NAME of ~/.config/s3repofs/NAME.json or "
                             "/etc/s3repofs/NAME.json")
    common.add_argument("-v", "--verbose", action="store_true", help="log what is done to stderr")
    common.add_argument("--debug", action="store_true", help="log debugging detail, tracebacks included")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar (on a terminal) nor progress lines (with -v)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    add("init", "Create the repository's schema and directories (idempotent).")
    p = add("status", "Show the configuration in use, the database, the store, counts of versions, and each host: "
                      "last seen, cache used and bound, versions held.")
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    p = add("add", "Add a local file as a new version of REPO_PATH (unpublished unless --publish).")
    p.add_argument("local_file", metavar="LOCAL_FILE")
    p.add_argument("repo_path", metavar="REPO_PATH", help="<type>/<dirs>/<name>; ending in / appends the file's name")
    p.add_argument("--publish", action="store_true", help="publish it once uploaded and verified")
    p.add_argument("--move", action="store_true",
                   help="move LOCAL_FILE in: a rename on the staging area's file system, else a copy whose "
                        "source is removed once uploaded; undone if the upload fails")
    p.add_argument("--json", action="store_true", help="print the version as JSON")

    p = add("publish", "Publish the newest unpublished (else expired) version of each PATH.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--version", dest="version_id", type=int, metavar="ID",
                   help="publish this version id (with a single PATH)")

    p = add("expire", "Expire the published version of each PATH.")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = add("ls", "List versions under PREFIX (a type, a directory or a path).")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    p.add_argument("--state", choices=STATE_CHOICES, default=State.PUBLISHED.value,
                   help="which versions (default: published)")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = add("cat", "Write the published version of PATH to standard output.")
    p.add_argument("path", metavar="PATH")

    p = add("get", "Copy the published version of PATH to the local file DEST.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("dest", metavar="DEST")

    p = add("info", "Show every version of PATH and its metadata.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON array")

    p = add("cache", "Show, empty or fill this host's local cache of published objects.")
    p.add_argument("action", choices=("status", "clear", "prefetch"),
                   help="status: usage; clear: delete cached objects (staged versions are kept); "
                        "prefetch: download the published versions under each PATH")
    p.add_argument("paths", nargs="*", metavar="PATH", help="for prefetch: files, directories or types")

    p = add("gc", "Delete what is no longer needed (stale unpublished versions, expired versions past "
                  "expired_retention, orphan objects, leftover staged files), after printing the plan.")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--json", action="store_true", help="print the plan (and the result) as JSON")

    p = add("rebuild", "Rebuild the metadata from the objects' self-descriptions into an empty database, when "
                       "every backup is lost: the newest version of each path is published, the others expired.")
    p.add_argument("--to", dest="target", required=True, metavar="DATABASE_URL",
                   help="an empty database: postgresql://... or sqlite:///abs/path.db")
    p.add_argument("--dry-run", action="store_true", help="read every object's description, write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add("fsck", "Check that each version's object is in the store with its recorded size (--deep: digest), "
                    "and look for objects no version references; --repair re-uploads from this host's copies "
                    "and adopts objects whose rows are lost (unrecorded).")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="a type, a directory or a path")
    p.add_argument("--deep", action="store_true", help="also read every object and check its digest")
    p.add_argument("--repair", action="store_true",
                   help="re-upload missing, wrong-size and corrupt objects from a verified copy on this host; "
                        "mark the others storage missing; adopt unrecorded objects as expired versions")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    from . import archive, backup, claims, mount, stats, systemd, tags

    archive.add_commands(add, COMMANDS)
    mount.add_commands(add, COMMANDS)
    backup.add_commands(add, COMMANDS)
    stats.add_commands(add, COMMANDS)
    systemd.add_commands(add, COMMANDS)
    tags.add_commands(add, COMMANDS)
    claims.add_commands(add, COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.debug)
    try:
        return COMMANDS[args.command](args) or 0
    except RepoError as exc:
        log.debug("failed", exc_info=True)
        print(f"s3repofs: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("s3repofs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: say so in one line; --debug shows the traceback
        log.debug("unexpected error", exc_info=True)
        print(f"s3repofs: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
              file=sys.stderr)
        return 70


def configure_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="s3repofs: %(levelname)s: %(message)s", stream=sys.stderr)
    if not debug:  # boto's own debug chatter is not for operators
        for name in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(name).setLevel(logging.WARNING)


def open_repo(args: argparse.Namespace) -> S3Repo:
    repo = S3Repo(args.config)
    if args.command != "init":
        repo.ensure_ready()
    return repo


@command("init")
def cmd_init(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        repo.create_repository()
        print(f"repository ready: {repo.db.describe()}; objects in {repo.store.describe_location()}; "
              f"local root {repo.config.local_root}")
    return 0


@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        status = status_ops.gather(repo)
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
        return 0
    print(f"config:     {status.config_source}")
    print(f"database:   {status.database} (schema version {status.schema_version})")
    print(f"objects:    {status.objects}")
    print(f"local root: {status.local_root}")
    print(f"cache:      {status.cache.objects} objects, {human(status.cache.used_bytes)} of "
          f"{human(status.cache.max_bytes)}")
    print("versions:   " + ", ".join(f"{count} {state}" for state, count in status.versions.items()))
    print(f"hosts:      {len(status.hosts)}")
    now = time.time()
    for host in status.hosts:
        cache = ("cache not reported" if host.cache_bytes is None else
                 f"cache {human(host.cache_bytes)} of {human(host.cache_bound)}, {host.cache_objects} objects")
        print(f"  {host.name}: {seen(host.last_seen, host.live, now)}; {cache}; holds {host.versions_held} versions")
    return 0


@command("add")
def cmd_add(args: argparse.Namespace) -> int:
    source = Path(args.local_file)
    check_source(source, args.move)  # before the repository is opened: a bad source is refused at once
    repo_path = args.repo_path + source.name if args.repo_path.endswith("/") else args.repo_path
    with open_repo(args) as repo:
        rf = copy_ops.add(repo, source, repo_path, publish=args.publish, move=args.move,
                          quiet=args.quiet or args.json)
        if args.json:
            print(json.dumps(rf.as_dict(), indent=2))
        else:
            print(f"{rf.state} {rf.path} (version {rf.id}, {rf.file_size} bytes, md5 {rf.md5})")
    return 0


@command("publish")
def cmd_publish(args: argparse.Namespace) -> int:
    if args.version_id is not None and len(args.paths) != 1:
        raise UsageError("--version takes a single PATH")
    with open_repo(args) as repo:
        for path in args.paths:
            if args.version_id is not None:
                rf = repo.get_version(args.version_id)
                if rf.path != path.strip("/"):
                    raise NotFoundError(f"{path}: version {args.version_id} is a version of {rf.path}")
            else:
                current = repo.get_file(path)
                # an expired version comes back only when nothing is published, so a repeated
                # `publish` (from cron, say) never flips between two versions
                rf = (repo.get_file(path, State.UNPUBLISHED)
                      or (None if current else repo.get_file(path, State.EXPIRED)))
                if rf is None:
                    raise NotFoundError(f"{path}: already published (version {current.id})" if current
                                        else f"{path}: no unpublished or expired version")
            rf.publish()
            print(f"published {rf.path} (version {rf.id})")
    return 0


@command("expire")
def cmd_expire(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        for path in args.paths:
            rf = repo.require_file(path).expire()
            print(f"expired {rf.path} (version {rf.id})")
    return 0


@command("ls")
def cmd_ls(args: argparse.Namespace) -> int:
    states = VISIBLE_STATES if args.state == "all" else (args.state,)
    with open_repo(args) as repo:
        files = repo.list_files(args.prefix, states)
        if args.json:
            print(json.dumps([f.as_dict() for f in files], indent=2))
            return 0
        for f in files:
            when = timestamp(f.published_at or f.created_at)
            stored = "" if f.storage == Storage.UPLOADED else f"  [{f.storage}]"  # staged, or lost (see fsck)
            tier = "" if f.tier == Tier.FRESH else f"  [{f.tier}]"  # archived or thawing: see s3repofs thaw
            print(f"{f.state:<11} {f.id:>8} {human(f.file_size):>9} {when}  {f.path}{stored}{tier}")
    return 0


@command("cat")
def cmd_cat(args: argparse.Namespace) -> int:
    with open_repo(args) as repo, repo.require_file(args.path).open("rb") as src:
        shutil.copyfileobj(src, sys.stdout.buffer, 1024 * 1024)
        sys.stdout.flush()
    return 0


@command("get")
def cmd_get(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / args.path.rstrip("/").rpartition("/")[2]
    with open_repo(args) as repo:
        rf = copy_ops.get(repo, args.path, dest, quiet=args.quiet)
        print(f"{rf.path} (version {rf.id}, {rf.file_size} bytes) -> {dest}")
    return 0


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        from ..domain.paths import RepoPath

        versions = [RepoFile(repo, v) for v in repo.meta.history(RepoPath.parse(args.path.strip("/")))]
        if not versions:
            raise NotFoundError(f"{args.path}: no such file in the repository")
        holders = repo.holders(f.id for f in versions)
        records = [{**f.as_dict(), "tags": f.tags, "holders": [h.as_dict() for h in holders.get(f.id, [])]}
                   for f in versions]
        if args.json:
            print(json.dumps(records, indent=2))
            return 0
        for record in records:
            print(f"version {record['version']}:")
            for key, value in record.items():
                if key.endswith("_at"):
                    value = timestamp(value)
                if key == "holders":
                    value = held_by(holders.get(record["version"], []), repo.host)
                print(f"  {key:<12} {value}")
    return 0


def held_by(holders: list, this_host: str) -> str:
    """``info``'s line of the hosts holding a verified copy: each with when it verified it, and its liveness."""
    now = time.time()
    return ", ".join(describe(h, now, this_host, verified=timestamp) for h in holders) or "-"


@command("cache")
def cmd_cache(args: argparse.Namespace) -> int:
    if (args.action == "prefetch") != bool(args.paths):
        raise UsageError("cache prefetch takes one or more PATHs; status and clear take none")
    with open_repo(args) as repo:
        if args.action == "clear":
            print(f"removed {cache_ops.clear(repo)} cached objects from {repo.cache.objects_dir}")
        elif args.action == "prefetch":
            plan = cache_ops.plan_prefetch(repo, args.paths)
            cache_ops.prefetch(repo, plan, quiet=args.quiet)
            print(f"{len(plan.files)} published files ({human(plan.size)}) are in the cache")
        usage = repo.cache.usage()
        print(f"cache: {usage.objects} objects, {human(usage.used_bytes)} of {human(usage.max_bytes)} "
              f"in {repo.cache.objects_dir}")
    return 0


@command("gc")
def cmd_gc(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        # gc refuses while a retained backup could name a purged version as published.
        plan = gc_ops.plan(repo, oldest_backup_at=backup_ops.oldest_backup_time(repo),
                           quiet=args.json or args.quiet)
        if not args.json:
            print_gc_plan(plan, args.verbose)
        result = None if args.dry_run else gc_ops.execute(repo, plan, quiet=args.json or args.quiet)
    if args.json:
        print(json.dumps({"plan": plan.as_dict(), "result": result and result.as_dict()}, indent=2))
    elif result is not None:
        removed = ", ".join(f"{result.removed[c]} {c}" for c in gc_ops.CATEGORIES)
        skipped = "".join(f"; left alone: {n} ({why})" for why, n in result.skipped.items())
        print(f"gc: removed {removed}; freed {human(result.bytes_freed)}{skipped}")
    return 0


def print_gc_plan(plan, verbose: bool) -> None:
    print(f"gc plan ({timestamp(plan.now)}):")
    for category in gc_ops.CATEGORIES:
        items = plan.items(category)
        print(f"  {category:<12} {len(items):>8}  {human(plan.size(category)):>10}  {gc_ops.MEANING[category]}")
        for item in items if verbose else ():
            what = f"version {item.version_id} {item.path or ''}" if item.version_id is not None else ""
            print(f"    {item.key}  {human(item.size)}  {what}".rstrip())
    if plan.unrecorded:  # never deleted: each may be a published file's only copy
        print(f"  {'unrecorded':<12} {len(plan.unrecorded):>8}  {human(sum(i.size for i in plan.unrecorded)):>10}  "
              f"{gc_ops.UNRECORDED_MEANING}")
        for item in plan.unrecorded if verbose else ():
            print(f"    {item.key}  {human(item.size)}  describes version {item.version_id} {item.path}")
    for why, count in plan.kept.items():
        print(f"  left alone: {count} ({why})")


@command("rebuild")
def cmd_rebuild(args: argparse.Namespace) -> int:
    config = load_config(args.config)  # not the repository's database: it is what was lost
    report = rebuild_ops.rebuild(config, args.target, dry_run=args.dry_run, quiet=args.json or args.quiet)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would write" if args.dry_run else "wrote"
    print(f"{verb} {report.versions} versions ({report.published} published, {report.expired} expired) from "
          f"{report.objects} objects into {report.target} in {report.seconds:.1f} s")
    for skipped in report.skipped:
        print(f"  skipped {skipped['key']}: {skipped['why']}")
    for name, count in report.defaulted.items():
        print(f"  {count} objects lack '{name}': took {rebuild_ops.DEFAULTED[name]}")
    print("not recorded in any object, so not rebuilt: " + "; ".join(rebuild_ops.NEVER_RECORDED))
    return 0


@command("fsck")
def cmd_fsck(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        report = fsck_ops.check(repo, args.prefix, deep=args.deep, quiet=args.json or args.quiet)
        if not args.json:  # the plan before the repair
            for finding in report.findings:
                print(finding.line())
            print(report.summary())
        repaired = fsck_ops.repair(repo, report, quiet=args.json or args.quiet) if args.repair else None
    if args.json:
        print(json.dumps({**report.as_dict(), "repair": repaired.as_dict() if repaired else None}, indent=2))
    elif repaired is not None:
        for done in repaired.repairs:
            print(done.line())
        print(repaired.summary())
    return 0 if report.clean else fsck_ops.FINDINGS_EXIT_STATUS


def human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def timestamp(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
