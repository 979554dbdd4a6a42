"""The local store of converted models: ``$STATECAST_HOME`` (default ``~/.cache/statecast``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

META_FILE = "statecast.json"  # a unified model's metadata file (here, not in layout.py: the store stays torch-free)


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


def list_models() -> list[dict]:
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        meta_path = d / META_FILE
        if d.name.startswith(".") or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        out.append({
            "name": d.name,
            "path": str(d),
            "family": meta.get("family"),
            "source": meta.get("source", {}).get("id"),
            "dtype": meta.get("dtype"),
            "n_params": meta.get("n_params"),
            "bytes": size,
            "verified": (json.loads((d / "parity.json").read_text()).get("passed") if (d / "parity.json").is_file() else None),
        })
    return out
