"""The CLI's rich consoles, and the one way user text reaches them.

Rich reads ``[...]`` in a printed string as markup, so a path, run name, grid value or
error message holding a chat tag such as ``[/INST]`` would crash the command
(``MarkupError``) or restyle its output. Every command prints user-derived text through
these helpers, which escape it (``rich.markup.escape``); only the styled label is markup.
Messages (errors, warnings, notes) also pass ``emguard.redact.redact_secrets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from emguard.redact import redact_secrets

console = Console()
err = Console(stderr=True)


def esc(value: Any) -> str:
    """``str(value)`` with rich markup escaped: safe inside an f-string that ``print``
    parses as markup, and as a ``Table`` cell or title."""
    return escape(str(value))


def _labelled(style: str, label: str, msg: Any, out: Console) -> None:
    # soft_wrap: a long path is not folded mid-word, so it can be copied as it is
    out.print(f"[{style}]{label}[/{style}] {esc(redact_secrets(str(msg)))}", soft_wrap=True)


def error(msg: Any, label: str = "error:", out: Console | None = None) -> None:
    """``error: MSG`` in red on stderr (``label`` replaces ``error:``, e.g. ``invalid:``)."""
    _labelled("red", label, msg, out or err)


def warning(msg: Any, out: Console | None = None) -> None:
    """``warning: MSG`` in yellow on stderr."""
    _labelled("yellow", "warning:", msg, out or err)


def note(msg: Any, out: Console | None = None) -> None:
    """``note: MSG`` in yellow on stderr."""
    _labelled("yellow", "note:", msg, out or err)


def plain(text: Any, out: Console | None = None) -> None:
    """Print ``text`` as it is: no markup, no highlighting (e.g. a Markdown table)."""
    (out or console).print(str(text), markup=False, highlight=False, soft_wrap=True)


def file_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be read as ``what`` (e.g. ``"config file"``), or None when it is
    a readable-looking regular file: a missing path and a directory get different words."""
    if path.is_dir():
        return f"{what} '{path}' is a directory, not a {what}"
    if not path.exists():
        return f"{what} '{path}' does not exist"
    if not path.is_file():
        return f"{what} '{path}' is not a regular file"
    return None
