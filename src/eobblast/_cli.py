"""What the eobblast commands share: the `--config` option and reading the file it names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from eobblast.config import Config, load_config
from eobblast.errors import EobblastError

F = TypeVar("F", bound=Callable[..., Any])


def config_option(help: str = "TOML configuration file.") -> Callable[[F], F]:
    """`--config FILE` (an existing file; absent: the defaults), passed as `config_path`."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help=help,
    )


def command_config(path: Path | None) -> Config:
    """The configuration a command runs with; an invalid one ends it with the reason."""
    try:
        return load_config(path)
    except EobblastError as exc:
        raise click.ClickException(str(exc)) from None
