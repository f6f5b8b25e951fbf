"""``s3repofs systemd install``: put the systemd units of the repository's top-level ``systemd/`` directory
in place (plan, then execute).

The units name ``/usr/local/bin/s3repofs``, where scripts/setup links the command; installed from another
Python (a virtualenv, a checkout), they are rewritten to name the ``s3repofs`` of the Python running this,
which systemd then runs. The unit files are read from the checkout (an editable install) or from
``<prefix>/share/s3repofs/systemd``, where setup.py's data_files put them: one copy, ``systemd/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import config_path
from ..errors import RepoError

DEFAULT_DEST = Path("/etc/systemd/system")
UNIT_EXECUTABLE = "/usr/local/bin/s3repofs"  # as the unit files spell it
EXAMPLE_CONFIG_NAME = "main"  # What= of mnt-s3repo.mount
# A unit's instance name: what systemd takes after '@' unescaped (systemd-escape would turn others into \x..).
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class UnitsError(RepoError):
    exit_status = 2


@dataclass(frozen=True)
class UnitFile:
    name: str
    text: str  # as it will be written
    action: str  # "create", "update" or "keep" (the same text is there already)


@dataclass(frozen=True)
class InstallPlan:
    source: Path
    dest: Path
    executable: str
    config_name: str | None
    units: list[UnitFile]
    reload: bool  # systemctl daemon-reload afterwards (systemd runs here and dest is its directory)
    notes: list[str] = field(default_factory=list)

    def commands(self) -> list[str]:
        """What to run afterwards to start the mount and the timers."""
        name = self.config_name or "NAME"
        reload = [] if self.reload else ["systemctl daemon-reload"]
        return [*reload, f"systemctl enable --now s3repofs@{name}.service",
                f"systemctl enable --now s3repofs-backup@{name}.timer s3repofs-gc@{name}.timer"]

    def as_json(self) -> dict:
        return {"source": str(self.source), "dest": str(self.dest), "executable": self.executable,
                "config_name": self.config_name, "reload": self.reload, "notes": self.notes,
                "units": [{"name": u.name, "action": u.action} for u in self.units], "commands": self.commands()}


def unit_source() -> Path:
    """The directory holding the unit files: the checkout's ``systemd/``, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "systemd"
    installed = Path(sys.prefix) / "share" / "s3repofs" / "systemd"
    for candidate in (checkout, installed):
        if (candidate / "s3repofs@.service").is_file():
            return candidate
    raise UnitsError(f"the systemd unit files are missing: looked in {checkout} and {installed}")


def installed_executable() -> str:
    """The ``s3repofs`` systemd should run: /usr/local/bin/s3repofs when it is this installation's command
    (scripts/setup links it there), else the command installed beside the running Python."""
    beside = Path(sys.executable).parent / "s3repofs"
    default = Path(UNIT_EXECUTABLE)
    if default.exists() and (not beside.exists() or default.resolve() == beside.resolve()):
        return UNIT_EXECUTABLE
    if beside.exists():
        return str(beside.absolute())
    raise UnitsError(f"no s3repofs command in {beside.parent} nor at {UNIT_EXECUTABLE}: pass --executable PATH")


def check_config_name(name: str) -> list[str]:
    """UnitsError if ``name`` cannot be a unit's instance; a note if no config file has that name yet."""
    if not _INSTANCE_NAME.fullmatch(name) or name.endswith(".json"):
        raise UnitsError(f"--config {name!r}: the units take a config NAME (/etc/s3repofs/NAME.json), "
                         "made of letters, digits, '_', '.' and '-'")
    try:
        config_path(name)
    except RepoError:
        return [f"no config named {name!r} yet: write /etc/s3repofs/{name}.json (mode 600) before starting"]
    return []


def plan(dest: Path = DEFAULT_DEST, config_name: str | None = None, executable: str | None = None) -> InstallPlan:
    """What ``install`` would write where; changes nothing."""
    source = unit_source()
    executable = executable or installed_executable()
    notes = check_config_name(config_name) if config_name else []
    units = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in (".service", ".timer", ".mount", ".automount"):
            text = rewrite(path.read_text(), executable, config_name)
            target = dest / path.name
            action = "create" if not target.exists() else "keep" if target.read_text() == text else "update"
            units.append(UnitFile(path.name, text, action))
    reload = systemd_running() and dest.resolve() == DEFAULT_DEST
    if not systemd_running():
        notes.append("systemd is not running here (PID 1 is not systemd): nothing to reload")
    return InstallPlan(source, dest, executable, config_name, units, reload, notes)


def rewrite(text: str, executable: str, config_name: str | None) -> str:
    """A unit's text as installed: the s3repofs command's path, and the example mount's config NAME."""
    text = text.replace(UNIT_EXECUTABLE, executable)
    if config_name:
        text = re.sub(rf"^What={EXAMPLE_CONFIG_NAME}$", f"What={config_name}", text, flags=re.MULTILINE)
    return text


def execute(install: InstallPlan) -> None:
    """Write the units (mode 644, atomically) and reload systemd when it runs here."""
    install.dest.mkdir(parents=True, exist_ok=True)
    for unit in install.units:
        if unit.action == "keep":
            continue
        target = install.dest / unit.name
        partial = target.with_name(f".{unit.name}.partial")
        partial.write_text(unit.text)
        partial.chmod(0o644)
        os.replace(partial, target)
    if install.reload:
        result = subprocess.run([shutil.which("systemctl") or "systemctl", "daemon-reload"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise UnitsError(f"systemctl daemon-reload failed: {result.stderr.strip()}")


def systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1 when /run/systemd/system exists."""
    return Path("/run/systemd/system").is_dir()
