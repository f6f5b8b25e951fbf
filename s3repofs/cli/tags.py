"""``s3repofs find``, ``tag`` and ``untag``: look versions up by tags, date tags and columns, and tag them."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from ..domain.lifecycle import State
from ..domain.tags import DATE_PERIODS, date_tags, parse_tag
from ..errors import UsageError

_EXAMPLES = date_tags(dt.datetime(2026, 11, 3, 14, tzinfo=dt.timezone.utc).timestamp())


def add_commands(add, commands: dict) -> None:
    from .main import STATE_CHOICES

    p = add("find", "List the versions under PREFIX that have every --tag, at least one --any-tag and no --no-tag "
                    "(KEY=VALUE, or KEY for any value), by version id. Date tags are of the creation time (UTC).")
    add_filter_options(p)
    p.add_argument("--state", choices=STATE_CHOICES, default=State.PUBLISHED.value,
                   help="which versions (default: published)")
    dates = p.add_mutually_exclusive_group()
    for period in DATE_PERIODS:
        dates.add_argument(f"--{period}", metavar=_EXAMPLES[period].replace("2026", "YYYY"),
                           help=f"created in this {period} (UTC), e.g. {_EXAMPLES[period]}")
    p.add_argument("--published-after", metavar="TIME", help="published at or after TIME (ISO 8601; UTC if no zone)")
    p.add_argument("--published-before", metavar="TIME", help="published before TIME (ISO 8601; UTC if no zone)")
    p.add_argument("--host", metavar="HOST", help="created on HOST (origin_host)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    commands["find"] = cmd_find

    p = add("tag", "Tag the published version of PATH (or --version ID) with each KEY=VALUE, or KEY (no value).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("tags", nargs="+", metavar="KEY[=VALUE]")
    p.add_argument("--version", dest="version_id", type=int, metavar="ID", help="tag this version of PATH")
    p.add_argument("--json", action="store_true", help="print the version's tags as JSON")
    commands["tag"] = cmd_tag

    p = add("untag", "Remove each tag KEY from the published version of PATH (or --version ID).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--version", dest="version_id", type=int, metavar="ID", help="untag this version of PATH")
    p.add_argument("--json", action="store_true", help="print the version's tags as JSON")
    commands["untag"] = cmd_untag


def cmd_find(args: argparse.Namespace) -> int:
    from .main import human, open_repo, timestamp

    date = next(((period, getattr(args, period)) for period in DATE_PERIODS if getattr(args, period)), None)
    with open_repo(args) as repo:
        found = repo.find(prefix=args.prefix, **filter_tags(args), state=None if args.state == "all" else args.state,
                          published_after=_time(args.published_after), published_before=_time(args.published_before),
                          origin_host=args.host, date=date)
        if args.json:  # written as found: constant memory however many match
            print("[", end="")
            for n, rf in enumerate(found):
                print(("," if n else "") + "\n  " + json.dumps(rf.as_dict()), end="")
            print("\n]")
            return 0
        for rf in found:
            print(f"{rf.state:<11} {rf.id:>8} {human(rf.file_size):>9} {timestamp(rf.published_at or rf.created_at)}"
                  f"  {rf.path}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    pairs = [parse_tag(text) for text in args.tags]  # all checked before the first is set
    return _change(args, lambda rf: [rf.tag(key, value) for key, value in pairs])


def cmd_untag(args: argparse.Namespace) -> int:
    keys = [parse_tag(key)[0] for key in args.keys]
    return _change(args, lambda rf: [rf.untag(key) for key in keys])


def _change(args: argparse.Namespace, change) -> int:
    from ..errors import NotFoundError
    from .main import open_repo

    with open_repo(args) as repo:
        rf = repo.require_file(args.path) if args.version_id is None else repo.get_version(args.version_id)
        if rf.path != args.path.strip("/"):
            raise NotFoundError(f"{args.path}: version {rf.id} is {rf.path}")
        change(rf)
        tags = rf.tags
        if args.json:
            print(json.dumps({"path": rf.path, "version": rf.id, "tags": tags}, indent=2))
        else:
            listed = " ".join(f"{k}={v}" if v else k for k, v in tags.items()) or "(none)"
            print(f"{rf.path} (version {rf.id}): {listed}")
    return 0


def add_filter_options(p: argparse.ArgumentParser) -> None:
    """PREFIX, --tag, --any-tag and --no-tag: the conditions of ``repo.find``, as find and claim take them."""
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="a type, a directory or a path")
    p.add_argument("--tag", action="append", default=[], metavar="KEY[=VALUE]", help="a tag each version has")
    p.add_argument("--any-tag", action="append", default=[], metavar="KEY[=VALUE]",
                   help="a tag of which each version has at least one")
    p.add_argument("--no-tag", action="append", default=[], metavar="KEY[=VALUE]", help="a tag no version has")


def filter_tags(args: argparse.Namespace) -> dict[str, dict[str, str | None]]:
    """The tag conditions of ``add_filter_options``, as ``repo.find``'s keyword arguments."""
    return {"tags_all": _tags(args.tag), "tags_any": _tags(args.any_tag), "tags_none": _tags(args.no_tag)}


def _tags(texts: list[str]) -> dict[str, str | None]:
    return dict(parse_tag(text) for text in texts)


def _time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r}: not an ISO 8601 time (e.g. 2026-11-03 or 2026-11-03T14:05:00+01:00)") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()
