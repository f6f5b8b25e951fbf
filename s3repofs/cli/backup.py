"""``s3repofs backup``, ``s3repofs backup list`` and ``s3repofs restore``: parse, call ops/backup.py and
ops/restore.py, print.

``backup list`` and ``restore`` read only the configuration: they work when the repository's database is
gone, which is when they are needed.
"""

from __future__ import annotations

import argparse
import json

from ..config import load_config
from ..ops import backup as backup_ops
from ..ops import restore as restore_ops


def add_commands(add, commands: dict) -> None:
    p = add("backup", "Back up the metadata database into the backup store (backup_s3_bucket, else the "
                      "objects' store, under backup_prefix), keeping the newest backup_keep; or list the backups.")
    p.add_argument("action", nargs="?", choices=("list",), help="list: show the backups instead of taking one")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["backup"] = cmd_backup

    p = add("restore", "Restore a backup (default: the newest) into the empty database DATABASE_URL.")
    p.add_argument("backup", nargs="?", metavar="BACKUP", help="the backup's name, as `backup list` shows it")
    p.add_argument("--to", required=True, metavar="DATABASE_URL",
                   help="the database to restore into: postgresql://... or sqlite:////abs/path.db")
    p.add_argument("--force", action="store_true", help="replace what the target database holds")
    p.add_argument("--newest-intact", action="store_true",
                   help="the newest backup in which every published version's object exists with its size")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--json", action="store_true", help="print JSON")
    commands["restore"] = cmd_restore


def cmd_backup(args: argparse.Namespace) -> int:
    if args.action == "list":
        listing = backup_ops.list_backups(load_config(args.config))
        if args.json:
            print(json.dumps(listing.as_dict(), indent=2))
            return 0
        from .main import human, timestamp

        print(f"backups in {listing.location}:")
        for b in reversed(listing.backups):
            print(f"  {b.name}  {timestamp(b.created_at)}  {b.versions:>9} versions  {human(b.size):>9}  "
                  f"schema {b.schema_version}, {b.database}")
        for name, why in listing.corrupt.items():
            print(f"  {name}  CORRUPT: {why}")
        for name in listing.incomplete:
            print(f"  {name}  incomplete (no manifest: in progress, or failed)")
        return 0
    from .main import human, open_repo

    with open_repo(args) as repo:
        result = backup_ops.backup(repo, quiet=args.json or args.quiet)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    made = result.backup
    print(f"backup {made.name}: {made.versions} versions, {sum(made.rows.values())} rows, {human(made.size)} "
          f"in {result.location} ({result.seconds:.1f} s)")
    for name in result.deleted:
        print(f"deleted older backup {name}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    plan = restore_ops.plan_restore(config, args.backup, args.to, force=args.force,
                                    newest_intact=args.newest_intact, quiet=args.json or args.quiet)
    if not args.json or args.dry_run:
        _print_plan(plan, args.json)
    if args.dry_run:
        return 0
    result = restore_ops.execute(config, plan, quiet=args.json or args.quiet)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    migrated = f", schema migrated from version {result.migrated_from}" if result.migrated_from else ""
    print(f"restored {plan.backup.name}: {result.rows.get('versions', 0)} versions, {sum(result.rows.values())} "
          f"rows into {plan.target}{migrated} ({result.seconds:.1f} s)")
    return 0


def _print_plan(plan: restore_ops.RestorePlan, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan.as_dict(), indent=2))
        return
    for skipped in plan.skipped:
        print(f"skipping backup {skipped.backup}: {skipped.reason}")
    print(f"restore backup {plan.backup.name} ({plan.backup.versions} versions, schema {plan.backup.schema_version}) "
          f"into {plan.target}")
    if plan.replaces:
        held = ", ".join(f"{n} {table}" for table, n in plan.target_rows.items() if n)
        print(f"replacing what it holds: {held}")
