"""Where things live: one place for every directory the project reads or writes.

Each root is an environment variable with a default, so a user can move it without code changes.
Names sent by clients are turned into paths only through `child()`, which refuses anything that
would leave its root.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a client-chosen name (JSON schema, HTML form pattern)
_NAME = re.compile(NAME_PATTERN[1:-1])  # whole string: fullmatch, never match + "$"


def cache_dir() -> Path:
    """Converted models and other derived files (safe to delete; rebuilt on demand)."""
    return Path(os.environ.get("SPD_CACHE_DIR", Path.home() / ".cache" / "spd")).expanduser()


def store_dir() -> Path:
    """The subspace store: one pack directory per capability mode."""
    return Path(os.environ.get("SPD_STORE_DIR", REPO_ROOT / "subspaces")).expanduser()


def check_name(name: str, what: str = "name") -> str:
    """A client-chosen name for a mode, adapter or job: short, plain, never a path."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def child(root: Path, name: str, what: str = "name") -> Path:
    """`root/name` for a validated name; guaranteed to stay inside `root`."""
    path = (root / check_name(name, what)).resolve()
    if path.parent != root.resolve():
        raise ValueError(f"invalid {what} {name!r}: resolves outside {root}")
    return path
