"""``s3repofs archive`` and ``thaw``: print the plan (ops/archive.py), then carry it out unless --dry-run."""

from __future__ import annotations

import argparse
import json

from ..domain.lifecycle import State
from ..ops import archive as archive_ops

_STATES = {"published": (State.PUBLISHED,), "expired": (State.EXPIRED,), "all": archive_ops.ARCHIVABLE_STATES}


def add_commands(add, commands: dict) -> None:
    p = add("archive", "Move the objects of the published and expired versions under each PATH (or of every version "
                       "created more than --older-than DAYS ago) into archive_storage_class; reading them then "
                       "needs `s3repofs thaw`.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="a type, a directory or a file")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="only versions created more than DAYS days ago")
    p.add_argument("--type", dest="file_type", metavar="T", help="only versions of type T")
    p.add_argument("--state", choices=tuple(_STATES), default="all", help="which versions (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--json", action="store_true", help="print the plan (and the result) as JSON")
    commands["archive"] = cmd_archive

    p = add("thaw", "Request the restore of the archived versions under each PATH (thawing), and finish each thaw "
                    "whose restore is done (the object copied back: fresh). Without PATH: finish those only.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="a type, a directory or a file")
    p.add_argument("--days", type=int, default=archive_ops.THAW_DAYS, metavar="N",
                   help=f"keep the restored copy N days (default {archive_ops.THAW_DAYS}): time to finish the thaw")
    p.add_argument("--state", choices=tuple(_STATES), default="published", help="which versions (default: published)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--json", action="store_true", help="print the plan (and the result) as JSON")
    commands["thaw"] = cmd_thaw


def cmd_archive(args: argparse.Namespace) -> int:
    from .main import open_repo

    with open_repo(args) as repo:
        plan = archive_ops.plan_archive(repo, args.paths, older_than_days=args.older_than, file_type=args.file_type,
                                        states=_STATES[args.state])
        return _run(args, plan, lambda: archive_ops.execute_archive(repo, plan, quiet=args.json or args.quiet))


def cmd_thaw(args: argparse.Namespace) -> int:
    from .main import open_repo

    with open_repo(args) as repo:
        plan = archive_ops.plan_thaw(repo, args.paths, days=args.days, states=_STATES[args.state])
        return _run(args, plan, lambda: archive_ops.execute_thaw(repo, plan, quiet=args.json or args.quiet))


def _run(args: argparse.Namespace, plan: archive_ops.TierPlan, execute) -> int:
    if not args.json:
        _print_plan(plan, args.verbose)
    result = None if args.dry_run else execute()
    if args.json:
        print(json.dumps({"plan": plan.as_dict(), "result": result and result.as_dict()}, indent=2))
    elif result is not None:
        done = ", ".join(f"{count} {outcome}" for outcome, count in result.as_dict()["outcomes"].items())
        print(f"{plan.action}: {done or 'nothing done'}" + (f"; {len(result.failed)} failed" if result.failed else ""))
        for failure in result.failed:
            print(f"  failed: {failure['why']}")
    return 1 if result is not None and result.failed else 0


def _print_plan(plan: archive_ops.TierPlan, verbose: bool) -> None:
    from .main import human

    if plan.action == "archive":
        what = f"into {plan.storage_class}"
    else:
        what = f"restored for {plan.days} days" if plan.request else "finish the thaws whose restore is done"
    print(f"{plan.action} plan: {len(plan.items)} versions, {human(plan.size)}, {what}")
    for item in plan.items if verbose or len(plan.items) <= 20 else ():
        print(f"  {item.state:<10} {item.tier:<9} {item.version_id:>8} {human(item.size):>9}  {item.path}")
    for why, count in plan.left_out.items():
        print(f"  left out: {count} ({why})")

