"""``s3repofs claim`` and ``release``: processing leases for shell scripts, which end with the command (no renewal):
``--lease`` is how long the caller has, then ``release --holder TOKEN --done`` records the work done."""

from __future__ import annotations

import argparse
import json
import sys

from ..leases import DEFAULT_LEASE, DEFAULT_TASK


def add_commands(add, commands: dict) -> None:
    from .tags import add_filter_options

    p = add("claim", "Lease up to --limit published files under PREFIX (with every --tag, one --any-tag, no --no-tag) "
                     "that no one holds and that are not done for --task, and print their paths. The lease is not "
                     "renewed: it ends after --lease seconds unless `release` ends it first.")
    add_filter_options(p)
    p.add_argument("--type", dest="file_type", metavar="TYPE", help="only files of this type")
    p.add_argument("--task", default=DEFAULT_TASK, help=f"the task the files are claimed for (default: {DEFAULT_TASK})")
    p.add_argument("--limit", type=int, default=1, metavar="N", help="claim at most N files (default: 1)")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE, metavar="SECONDS",
                   help=f"how long the caller has to finish (default: {DEFAULT_LEASE:.0f})")
    p.add_argument("--holder", metavar="TOKEN",
                   help="name the leases TOKEN (default: a new token, printed on stderr, or in the JSON)")
    p.add_argument("--json", action="store_true", help="print the holder, the leases' end and the files as JSON")
    commands["claim"] = cmd_claim

    p = add("release", "End the leases of --holder TOKEN (all, or those on each PATH): with --done, record the files "
                       "done for their task (claim never hands them out for it again); without, free them at once.")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--holder", required=True, metavar="TOKEN", help="the holder `claim` printed or was given")
    p.add_argument("--done", action="store_true", help="record the files done for their task")
    p.add_argument("--dry-run", action="store_true", help="print the leases that would end and stop")
    p.add_argument("--json", action="store_true", help="print the leases ended as JSON")
    commands["release"] = cmd_release


def cmd_claim(args: argparse.Namespace) -> int:
    from .main import open_repo
    from .tags import filter_tags

    with open_repo(args) as repo:
        claim = repo.claim(args.file_type, args.prefix, **filter_tags(args), limit=args.limit, lease=args.lease,
                           task=args.task, holder=args.holder)
        files = claim.acquire()
    if args.json:
        print(json.dumps({"holder": claim.holder.token, "task": claim.task, "expires_at": claim.expires_at,
                          "files": [rf.as_dict() for rf in files]}, indent=2))
        return 0
    if files and not args.holder:
        print(f"s3repofs: holder {claim.holder.token} (end with: s3repofs release --holder {claim.holder.token} "
              "[--done])", file=sys.stderr)
    for rf in files:
        print(rf.path)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from .main import open_repo

    with open_repo(args) as repo:
        leases = repo.release_claims(args.holder, args.paths, done=args.done, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"holder": args.holder, "done": args.done and not args.dry_run, "dry_run": args.dry_run,
                          "files": [{"path": lease.path, "version": lease.version_id, "task": lease.task}
                                    for lease in leases]}, indent=2))
        return 0
    verb = "would end" if args.dry_run else "recorded done" if args.done else "released"
    for lease in leases:
        print(f"{verb}: {lease.path} (version {lease.version_id}, task {lease.task})")
    return 0
