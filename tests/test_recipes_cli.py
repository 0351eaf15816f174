"""Every shipped recipe parses against its command; --help teaches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from moekit.cli.main import COMMANDS, main
from moekit.config import CONFIG_CLASSES, config_class, read_recipe, recipe_section

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_against_its_commands(path):
    sections = read_recipe(path)
    assert sections, f"{path.name} is empty"
    for section in sections:
        assert section in CONFIG_CLASSES, f"{path.name}: no command parses section {section!r}"
        cls = config_class(section)
        values = recipe_section(path, section, cls)
        for f in dataclasses.fields(cls):  # positional arguments a recipe may leave to the CLI
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values.setdefault(f.name, "placeholder")
        cls(**values)  # validates on construction


def test_help_lists_every_command_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_bad_recipe_section_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("upcycel:\n  num_experts: 2\n")
    assert main(["upcycle", "a", "b", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "unknown section 'upcycel'" in err and len(err.strip().splitlines()) == 1


def test_help_does_not_import_the_heavy_stack():
    import subprocess
    import sys

    code = ("import sys; from moekit.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))")
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"
