"""``mount.fuse.s3repofs``: the helper mount(8) runs for ``mount -t fuse.s3repofs`` and fstab lines, mounting
through ``s3repofs mount``'s own path (cli/mount.py ``start_mount``).

mount(8) calls ``/sbin/mount.fuse.s3repofs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`` (it
looks for helpers in /sbin only), and fuse3's mount.fuse3 calls a helper the same way. SOURCE is a config
file or a config NAME (``--config``'s meaning); ``default`` and ``s3repofs`` mean the configuration
``s3repofs`` uses without ``--config`` unless a config of that name exists. ``-o config=`` overrides SOURCE.
The helper returns once the tree is mounted, its daemon left running, as mount(8) expects. Errors are one
line on stderr with mount(8)'s exit statuses: 1 for an incorrect invocation, 32 for a failed mount.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import config_path
from ..errors import ConfigError, RepoError, UsageError
from .main import configure_logging
from .mount import MOUNT_OPTIONS, parse_options, start_mount

PROG = "mount.fuse.s3repofs"
EXIT_USAGE = 1  # mount(8)'s "incorrect invocation or permissions"
EXIT_MOUNT_FAILED = 32  # mount(8)'s "mount failure"

DEFAULT_SOURCES = ("default", "s3repofs")
# Options meant for mount(8), systemd or the kernel's access-time handling (this tree records no access
# times; libfuse takes only atime/noatime): dropped, never passed to FUSE.
DROPPED = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime",
    "iversion", "noiversion", "silent", "loud",
})
DROPPED_PREFIXES = ("x-", "comment=", "_")  # x-systemd.*, x-gvfs-*, comment=..., _netdev, _anything
OURS = ("config", "log")  # -o config=FILE|NAME (overrides SOURCE), -o log=FILE (the daemon's log)


@dataclass(frozen=True)
class HelperOptions:
    """What mount(8)'s ``-o`` asks of us: our own settings, the options for the mount, and what was dropped."""

    config: str | None
    log: str | None
    mount_options: str  # for start_mount (checked there against MOUNT_OPTIONS)
    dropped: tuple[str, ...]


def translate_options(text: str, sloppy: bool = False) -> HelperOptions:
    """Sort mount(8)'s comma-separated options; ``sloppy`` (mount -s) also drops options no mount takes."""
    ours: dict[str, str] = {}
    kept: list[str] = []
    dropped: list[str] = []
    for item in filter(None, (o.strip() for o in text.split(","))):
        key, sep, value = item.partition("=")
        if key in OURS:
            if not value:
                raise UsageError(f"mount option {key!r} needs a value: {key}=...")
            ours[key] = value
        elif item in DROPPED or item.startswith(DROPPED_PREFIXES) or (sloppy and key not in MOUNT_OPTIONS):
            dropped.append(item)
        else:
            kept.append(item)
    return HelperOptions(ours.get("config"), ours.get("log"), ",".join(kept), tuple(dropped))


def resolve_source(source: str) -> str | None:
    """The config SOURCE names, as an absolute path (the daemon must not depend on the cwd), or None for the
    default configuration."""
    try:
        return str(config_path(source).absolute())
    except ConfigError:
        if source in DEFAULT_SOURCES:
            return None
        raise


def with_fsname(mount_options: str, source: str) -> str:
    """Show SOURCE as the mount's source in the mount table: ``mount -a`` then sees the fstab line is mounted,
    and ``findmnt`` which configuration is. A SOURCE that ``-o`` cannot carry keeps the default name."""
    if any(o.startswith("fsname=") for o in mount_options.split(",")) or any(c in source for c in ", \t\n\\"):
        return mount_options
    return ",".join(filter(None, (mount_options, f"fsname={source}")))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Mount an s3repofs repository; run by mount(8) for -t fuse.s3repofs.",
                     epilog="SOURCE: a config file or NAME (~/.config/s3repofs/NAME.json, /etc/s3repofs/NAME.json); "
                            "'default' or 's3repofs': the default configuration.")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="mount(8)-style options: FUSE's (ro, allow_other, uid=...), config=, log=; "
                             "mount(8)'s and systemd's own (_netdev, nofail, x-systemd.*...) are ignored")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="ignore options no mount takes")
    parser.add_argument("-f", dest="fake", action="store_true", help="check everything, but do not mount")
    parser.add_argument("-n", dest="no_mtab", action="store_true", help="(accepted: nothing writes /etc/mtab)")
    parser.add_argument("-v", dest="verbose", action="store_true", help="say what was mounted")
    parser.add_argument("-N", dest="namespace", metavar="NS", help="(refused: not supported)")
    parser.add_argument("-t", dest="type", metavar="TYPE", help="(accepted: fuse.s3repofs)")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, False)
    if args.namespace:
        raise UsageError("-N (mount in another namespace) is not supported: run mount in that namespace")
    options = translate_options(",".join(args.options), sloppy=args.sloppy)
    config = resolve_source(options.config or args.source)
    log_file = Path(options.log).absolute() if options.log else None
    if args.fake:
        parse_options(options.mount_options)
        return 0
    mounted = start_mount(config, args.mountpoint, with_fsname(options.mount_options, args.source), log_file)
    if args.verbose:
        dropped = f"; ignored {','.join(options.dropped)}" if options.dropped else ""
        print(f"mounted {mounted.mountpoint} (daemon pid {mounted.pid}, log {mounted.log_path or 'stderr'}{dropped})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RepoError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    except Exception as exc:  # a bug: one line, as every error
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_MOUNT_FAILED


if __name__ == "__main__":
    sys.exit(main())
