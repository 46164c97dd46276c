"""`fl2t bench continual` and `fl2t bench speed`: thin; each calls its module."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Benchmarks: the continual protocol (quality) and speed.", no_args_is_help=True)
