"""Reading config files: YAML (or a shipped preset name) plus ``--set key=value`` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from twotower_core.config import Config, ConfigError, config_from_dict

PRESETS_DIR = Path(__file__).parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config_dict(path_or_preset: str | None) -> dict[str, Any]:
    """A YAML file path, or the name of a shipped preset (``default``, ``debug``)."""
    if path_or_preset is None:
        path = PRESETS_DIR / "default.yaml"
    elif (PRESETS_DIR / f"{path_or_preset}.yaml").exists() and not Path(path_or_preset).exists():
        path = PRESETS_DIR / f"{path_or_preset}.yaml"
    else:
        path = Path(path_or_preset)
    if not path.exists():
        raise ConfigError(
            f"config file {path_or_preset} not found (presets: {', '.join(preset_names())})"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    path_or_preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    return config_from_dict(load_config_dict(path_or_preset), overrides=overrides)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML config file, or a shipped preset name ({', '.join(preset_names()) or 'default'}); "
        "default: the 'default' preset",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set loss.name=bpr (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
