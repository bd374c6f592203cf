"""What a benchmark writes beside its numbers: the settings it ran with (the argparse
namespace, paths as text) and, for ``write_result``, the package versions."""

from __future__ import annotations

import argparse
from pathlib import Path


def settings_of(args: argparse.Namespace) -> dict:
    """The command-line settings as JSON-ready values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_result(path: Path, benchmark: str, args: argparse.Namespace, result: dict) -> dict:
    """Write ``{benchmark, settings, **result, provenance}`` atomically to ``path``; return it."""
    from emguard.io import provenance, write_json_atomic

    out = {"benchmark": benchmark, "settings": settings_of(args), **result,
           "provenance": provenance()}
    write_json_atomic(path, out)
    print(f"wrote {path}")
    return out
