"""Shared terminal output: one-line errors on stderr, human-readable sizes."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def one_line(msg: object) -> str:
  return " ".join(str(msg).split())


def fail(msg: object, code: int = 1) -> NoReturn:
  """Print `error: msg` on one line to stderr and exit with `code` (no traceback)."""
  err.print(Text.assemble(("error: ", "bold red"), one_line(msg)), soft_wrap=True)
  raise typer.Exit(code)


def say(msg: str) -> None:
  """Print a plain status line to stdout (no markup, no wrapping)."""
  out.print(Text(msg), soft_wrap=True)


def human_size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1000:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} TB"


def human_count(n: int | None) -> str:
  if n is None:
    return "?"
  if n >= 1e9:
    return f"{n / 1e9:.1f}B"
  if n >= 1e6:
    return f"{n / 1e6:.0f}M"
  return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)
