"""The local store of converted models: ``$STATECAST_HOME`` (default ``~/.cache/statecast``),
and the temporary names every atomic write uses (so that leftovers of killed runs can be
recognised and removed). Torch-free."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

META_FILE = "statecast.json"  # a unified model's metadata file (here, not in layout.py: the store stays torch-free)
PARITY_FILE = "parity.json"

# Temporary names: ``.NAME.KIND-PID-START-RANDOM`` beside (or, for ``tmp`` files, in place of)
# the output NAME. KIND is ``partial`` (a directory being written), ``old`` (a replaced output
# being deleted) or ``tmp`` (a file being written); PID and START (the process's start time in
# clock ticks since boot, 0 where unknown) identify the writer, so that a leftover whose writer
# is gone (kill -9, power loss) is told apart from a live one, even after the pid is reused.
TEMP_KINDS = ("partial", "old", "tmp")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|tmp)-(?P<pid>\d+)-(?P<start>\d+)-[^.\s/]+$")


def home() -> Path:
    """Read at call time, so tests and users can point it anywhere."""
    return Path(os.environ.get("STATECAST_HOME") or Path.home() / ".cache" / "statecast")


def models_dir() -> Path:
    return home() / "models"


def slug(name: str, revision: str | None = None) -> str:
    """``org/name`` -> ``org--name`` (plus ``@revision`` when not the default)."""
    s = name.strip("/").replace("/", "--")
    if revision and revision != "main":
        s += "@" + revision.replace("/", "--")
    return s


def path_for(name: str, revision: str | None = None) -> Path:
    return models_dir() / slug(name, revision)


def resolve(ref: str | Path) -> Path:
    """A model path, or a name in the store (``org/name`` or ``org--name``)."""
    p = Path(ref)
    if p.exists():
        return p
    for candidate in (models_dir() / str(ref), models_dir() / slug(str(ref))):
        if (candidate / META_FILE).is_file():
            return candidate
    return p


# --------------------------------------------------------------------------- temporary names and leftovers


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot) from ``/proc``; None when no such
    process, 0 where ``/proc`` is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else 0
    except OSError:
        return 0
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return 0


def owner_tag() -> str:
    """``PID-START`` of this process, for temporary names."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid) or 0}"


def temp_prefix(name: str, kind: str) -> str:
    """The prefix of a temporary sibling of ``name`` (``tempfile`` adds a random suffix)."""
    assert kind in TEMP_KINDS
    return f".{name}.{kind}-{owner_tag()}-"


def _alive(pid: int, start: int) -> bool:
    if pid == os.getpid():  # ours, unless an earlier process with this pid left it
        mine = _start_time(pid) or 0
        return start == 0 or mine == 0 or mine == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    except OSError:
        return True
    if start:
        now = _start_time(pid)
        if now is None:
            return False
        if now and now != start:  # the pid was reused by a later process
            return False
    return True


def is_stale(name: str) -> bool:
    """A temporary name (see :data:`TEMP_KINDS`) whose writing process is gone."""
    m = _TEMP.match(name)
    return bool(m) and not _alive(int(m["pid"]), int(m["start"]))


def clean_stale(directory: Path) -> list[str]:
    """Remove the leftovers of killed runs in ``directory`` (temporary directories and files
    whose writer is no longer running); returns their names. Never raises."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not is_stale(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    return removed


# --------------------------------------------------------------------------- listing


def read_parity(model_dir: Path) -> tuple[bool | None, str]:
    """(passed, status) from a model's ``parity.json``: status is ``verified``, ``parity FAILED``,
    ``not verified`` or ``parity.json unreadable`` (empty, corrupt, not UTF-8, not an object
    with a boolean ``passed``): a broken report never breaks the listing of the store."""
    path = Path(model_dir) / PARITY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "not verified"
    except OSError:
        return None, f"{PARITY_FILE} unreadable"
    try:
        report = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, f"{PARITY_FILE} unreadable"
    if not isinstance(report, dict) or not isinstance(report.get("passed"), bool):
        return None, f"{PARITY_FILE} unreadable"
    return report["passed"], "verified" if report["passed"] else "parity FAILED"


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def list_models(cleaned: list[str] | None = None) -> list[dict]:
    """The models in the store. Leftovers of killed runs (``.NAME.partial-*``, ``.NAME.old-*``,
    temporary files inside models) are removed on the way; their names are appended to
    ``cleaned`` when a list is passed. A model whose ``statecast.json`` or ``parity.json``
    cannot be read is listed with a ``status`` saying so, never an exception."""
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    removed = clean_stale(root)
    for d in sorted(root.iterdir()):
        meta_path = d / META_FILE
        if d.name.startswith(".") or not meta_path.is_file():
            continue
        removed += [f"{d.name}/{n}" for n in clean_stale(d)]
        try:
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        except OSError:
            size = 0
        meta = _read_meta(meta_path)
        if meta is None:
            out.append({"name": d.name, "path": str(d), "family": "?", "source": None, "dtype": "?", "n_params": 0,
                        "bytes": size, "verified": None, "status": f"{META_FILE} unreadable"})
            continue
        source = meta.get("source")
        verified, status = read_parity(d)
        n_params = meta.get("n_params")
        out.append({
            "name": d.name,
            "path": str(d),
            "family": str(meta.get("family", "?")),
            "source": source.get("id") if isinstance(source, dict) else None,
            "dtype": str(meta.get("dtype", "?")),
            "n_params": n_params if isinstance(n_params, int) and not isinstance(n_params, bool) else 0,
            "bytes": size,
            "verified": verified,
            "status": status,
        })
    if cleaned is not None:
        cleaned.extend(removed)
    return out
