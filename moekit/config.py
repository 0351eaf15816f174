"""YAML recipes: one file, one section per command (``upcycle:``, ``pretrain:`` ...).

A section's keys are exactly the fields of that command's config dataclass;
unknown keys are an error, and CLI flags override the recipe.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError

SECTIONS = ("upcycle", "eval", "pretrain", "finetune", "merge", "push")
# section -> "module:Class" of the config it is parsed into (added as commands arrive)
CONFIG_CLASSES = {
    "upcycle": "moekit.upcycle.config:UpcycleConfig",
    "eval": "moekit.eval.perplexity:EvalConfig",
    "pretrain": "moekit.pretrain.config:PretrainConfig",
    "finetune": "moekit.finetune.config:FinetuneConfig",
    "merge": "moekit.merge.config:MergeConfig",
    "push": "moekit.hub.push:PushConfig",
}


def config_class(section: str):
    import importlib

    module, _, name = CONFIG_CLASSES[section].partition(":")
    return getattr(importlib.import_module(module), name)


def read_recipe(path: str | os.PathLike) -> dict[str, dict]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist — check the --config path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}) — fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"recipe {path}: unknown section {unknown[0]!r} — valid sections: {', '.join(SECTIONS)}")
    return data


def recipe_section(path: str | os.PathLike | None, section: str, cls) -> dict[str, Any]:
    """The ``section`` of a recipe as a dict of ``cls`` fields (empty without a recipe)."""
    if path is None:
        return {}
    values = read_recipe(path).get(section) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path}: section {section!r} must be a mapping of settings")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(
                f"recipe {path}: unknown key {section}.{key} — valid keys: {', '.join(sorted(names))}"
            )
    return dict(values)


def build_config(cls, recipe: str | os.PathLike | None, section: str, **cli: Any):
    """``cls`` from recipe values overridden by the CLI values that were given (not None)."""
    values = recipe_section(recipe, section, cls)
    values.update({k: v for k, v in cli.items() if v is not None})
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise ConfigError(
            f"missing {', '.join(m.upper() for m in missing)} — give {'it' if len(missing) == 1 else 'them'} "
            f"on the command line (see moekit {section} --help) or in the recipe's {section}: section"
        )
    return cls(**values)


def to_recipe(config, section: str) -> str:
    """The resolved config as a recipe that reproduces this run."""
    import yaml

    return yaml.safe_dump({section: dataclasses.asdict(config)}, sort_keys=False)
