"""``s3repofs systemd install``: parse, call ops/units.py, print what was done and what to run next."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..ops import units as units_ops


def add_commands(add, commands: dict) -> None:
    p = add("systemd", "Install the systemd units (s3repofs@NAME.service: the mount; gc and backup timers; an "
                       "example .mount/.automount) and say how to enable them for the config NAME (--config).")
    p.add_argument("action", choices=("install",))
    p.add_argument("--dest", type=Path, default=units_ops.DEFAULT_DEST, metavar="DIR",
                   help=f"where to write the units (default: {units_ops.DEFAULT_DEST})")
    p.add_argument("--executable", metavar="PATH",
                   help="the s3repofs command the units run (default: this installation's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    commands["systemd"] = cmd_systemd


def cmd_systemd(args: argparse.Namespace) -> int:
    install = units_ops.plan(args.dest.absolute(), args.config, args.executable)
    if not args.dry_run:
        units_ops.execute(install)
    if args.json:
        print(json.dumps({**install.as_json(), "dry_run": args.dry_run}, indent=2))
        return 0
    verb = "would write" if args.dry_run else "wrote"
    print(f"{verb} {len(install.units)} units from {install.source} to {install.dest} "
          f"(running {install.executable}):")
    for unit in install.units:
        print(f"  {unit.action:<6} {unit.name}")
    for note in install.notes:
        print(f"note: {note}")
    if install.reload and not args.dry_run:
        print("systemctl daemon-reload: done")
    print("then run (gc and backup on one host per repository):")
    for line in install.commands():
        print(f"  {line}")
    return 0
