"""User-given strings that become paths: one check, so none escapes the folder it names.

Study, domain and arm names become folder and file names as they are, so they must be
names (``check_name``). Grid values become part of a run's folder name; a value that is
not a plain token (a data path, a prompt, a list) gets a short hash instead
(``label``). Paths read from files a user can edit (a study manifest's run folders)
must stay inside the folder they belong to (``inside``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_RULE = "use 1-100 letters, digits, '_', '.', '-', starting with a letter or digit"
_TOKEN = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")


class UnsafePathError(ValueError):
    """A user-given name or path would leave the folder it belongs in."""


def check_name(value: str, what: str) -> str:
    """``value`` if it can name a file or folder as it is; else UnsafePathError naming
    ``what`` (e.g. ``"study name"``)."""
    if not isinstance(value, str) or not NAME.match(value):
        raise UnsafePathError(f"{what} '{value}' cannot name a folder: {NAME_RULE}")
    return value


def label(value: Any) -> str:
    """A grid value as it appears in a folder name: itself when it is a plain token
    (``0.0001``, ``True``, ``mean_token``), else ``h`` + 8 hex digits of its SHA-256."""
    text = str(value)
    if _TOKEN.match(text) and text not in (".", ".."):
        return text
    return "h" + hashlib.sha256(repr(value).encode("utf-8")).hexdigest()[:8]


def inside(path: str | Path, parent: str | Path, what: str) -> Path:
    """``parent / path`` when it resolves to ``parent`` or below it (symlinks followed);
    else UnsafePathError naming ``what``. An absolute ``path`` must lie below too."""
    root = Path(parent).resolve()
    full = (Path(parent) / path).resolve()
    if full != root and root not in full.parents:
        raise UnsafePathError(f"{what} '{path}' lies outside {parent}")
    return Path(parent) / path
