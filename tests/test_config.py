"""One frozen configuration per stage: the single source of defaults and checks, what
``params.yaml`` and the command line map onto, and errors that name fields in the library and
flags on the command line."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from pipeline.backbone.config import PretrainConfig
from pipeline.errors import ConfigError, HsicacheError
from pipeline.features.config import ContextConfig, ExtractConfig
from pipeline.scene.config import PrepareConfig
from stages._errors import in_flags
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "context": ContextConfig,
    "extract": ExtractConfig,
}
VALID = {ExtractConfig: {"sites": ("up1.res1",)}}


def _command(name):
    return get_command(app).commands[name]


@pytest.mark.parametrize("section", CONFIGS)
def test_params_yaml_section_maps_onto_the_config(section):
    cls = CONFIGS[section]
    values = yaml.safe_load((ROOT / "params.yaml").read_text())[section]
    fields = {k: v for k, v in values.items() if k in cls.field_names()}
    assert fields, f"no `{section}` key of params.yaml is a {cls.__name__} field"
    config = cls.from_mapping(fields)
    for key, value in fields.items():
        got = getattr(config, key)
        assert (list(got) if isinstance(got, tuple) else got) == (
            value if value is not None else cls.default(key)
        )


@pytest.mark.parametrize("section", CONFIGS)
def test_options_of_config_fields_default_to_none_and_show_the_configs_default(section):
    """A default lives in the configuration only: the command's option for a field has none
    (``None``: not given) and its help shows the configuration's."""
    cls = CONFIGS[section]
    options = {p.name.rstrip("_"): p for p in _command(section).params}
    mapped = [name for name in cls.field_names() if name in options]
    assert len(mapped) >= 5
    for name in mapped:
        assert options[name].default is None, f"--{name} has a default of its own"
        default = cls.default(name)
        if default not in (None, ()):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert f"(default {shown.lower() if isinstance(default, bool) else shown})" in (
                options[name].help or ""
            ), name


@pytest.mark.parametrize("cls", list(CONFIGS.values()))
def test_configs_are_frozen_and_refuse_unknown_settings(cls):
    config = cls(**VALID.get(cls, {}))
    name = cls.field_names()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, getattr(config, name))
    with pytest.raises(ConfigError, match=rf"unknown {cls.section} setting `colour`"):
        cls.from_mapping({"colour": 1})
    with pytest.raises(ConfigError, match=r"unknown .* setting `colour`"):
        config.replace(colour=1)


def test_lists_become_tuples_and_one_value_a_tuple_of_one():
    config = ExtractConfig(sites="up1.res1", timesteps=[0, 50])
    assert config.sites == ("up1.res1",) and config.timesteps == (0, 50)
    assert hash(config) == hash(ExtractConfig(sites=["up1.res1"], timesteps=(0, 50)))
    assert config.to_dict()["timesteps"] == [0, 50]


@pytest.mark.parametrize(
    ("cls", "bad", "message"),
    [
        (ExtractConfig, {"stride": 0}, r"`stride` must be at least 1, got 0"),
        (ExtractConfig, {"stride": 6, "zoom": 4}, r"`stride=6` must be a multiple of `zoom=4`"),
        (ExtractConfig, {"dtype": "fp8"}, r"`dtype` must be one of auto"),
        (ExtractConfig, {"sites": ()}, r"at least one site in `sites`"),
        (PrepareConfig, {"split": "random"}, r"unknown `split=random`"),
        (PrepareConfig, {"clip_low": 99.0}, r"`clip_low` 99 must be below `clip_high` 98"),
        (PretrainConfig, {"crop": 30}, r"`crop=30` must be a multiple of 4"),
        (PretrainConfig, {"weights_dtype": "int8"}, r"`weights_dtype` must be one of fp32"),
        (ContextConfig, {"components": 0}, None),  # checked against the scene: see below
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_made_naming_the_field(cls, bad, message):
    if message is None:
        config = cls(**bad)
        with pytest.raises(ConfigError, match=r"`components` must be"):
            config.check((10, 10), bands=20)
        return
    with pytest.raises(HsicacheError, match=message):  # ConfigError, SplitError
        cls(**{**VALID.get(cls, {}), **bad})


def test_the_command_line_names_the_flag_for_the_same_mistake(runner, tmp_path):
    with pytest.raises(ConfigError, match=r"`stride=6` must be a multiple of `zoom=4`"):
        ExtractConfig(sites="up1.res1", stride=6, zoom=4)
    result = runner.invoke(app, ["extract", "--scene", str(tmp_path / "s.zarr"), "--backbone",
                                 "builtin:tiny", "--sites", "up1.res1", "--out",
                                 str(tmp_path / "f.zarr"), "--stride", "6", "--zoom", "4"])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: `--stride 6` must be a multiple of `--zoom 4` (a window's owned square must "
        "cover whole scene pixels)"
    )
    assert not (tmp_path / "f.zarr").exists()


def test_in_flags_translates_only_the_commands_parameters():
    ctx = _command("prepare").make_context("prepare", ["--out", "x"], resilient_parsing=True)
    said = in_flags(
        "`split=official` needs `train_mask`; pass `allow_degenerate=True`; `cube.mat` and "
        "`seed` and `colour` and ``stride``",
        ctx,
    )
    assert said == (
        "`--split official` needs `--train-mask`; pass `--allow-degenerate`; `cube.mat` and "
        "`--seed` and `colour` and ``stride``"
    )
    compare = _command("compare").make_context("compare", ["--scene", "s"], resilient_parsing=True)
    assert in_flags("give `context_store=C.zarr`", compare) == "give `--context-store C.zarr`"


def test_in_flags_leaves_the_users_own_values_alone():
    argv = ["--cube", "seed", "--labels", "labels", "--key", "cube", "--out", "x"]
    ctx = _command("prepare").make_context("prepare", argv, resilient_parsing=True)
    assert in_flags("cube file `seed` does not exist", ctx) == "cube file `seed` does not exist"
    assert in_flags("`labels` has no variable `cube` (`key`); `gamma`", ctx) == (
        "`labels` has no variable `cube` (`--key`); `--gamma`"
    )
    argv = ["--scene", "scene", "--features", "features", "--head", "h", "--seeds", "0"]
    ctx = _command("evaluate").make_context("evaluate", argv, resilient_parsing=True)
    said = in_flags("scene store `scene`; feature cache `features`; give `seeds`", ctx)
    assert said == "scene store `scene`; feature cache `features`; give `--seeds`"
    argv = ["--scene", "s", "--head", "h", "--context", "mean7,seed", "--sites", "context",
            "--out", "o"]  # fmt: skip
    ctx = _command("train").make_context("train", argv, resilient_parsing=True)
    said = in_flags("family `seed`; site `context`; `mean7`; `out`", ctx)
    assert said == "family `seed`; site `context`; `mean7`; `--out`"


def test_library_messages_name_parameters_not_flags():
    """No string in the library, docstrings aside, names a command-line flag in backticks: the
    command line translates field names (``in_flags``), so a notebook user is never told
    about a flag."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and re.search(r"(?<!`)`--[a-z]", node.value)
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]}")
    allowed = {"pipeline/heads/registry.py"}  # `--params`: the help text of the CLI itself
    assert [f for f in found if f.split(":")[0] not in allowed] == []


def test_public_stage_functions_take_inputs_outputs_and_a_config():
    """No test hook in a public signature: interruptions are simulated from outside
    (``tests/interrupt.py``, ``tests/killpoint.py``)."""
    from pipeline.backbone.pretraining import pretrain
    from pipeline.features.extract import extract_features
    from pipeline.scene.preparation import prepare

    for fn in (extract_features, pretrain, prepare):
        params = inspect.signature(fn).parameters
        assert "config" in params and not [p for p in params if p.startswith("stop")]


def test_every_section_a_command_reads_is_known_to_the_spelling_check():
    from pipeline.io.params import SECTIONS

    def commands(group):  # every command, in groups too (cache, bench)
        for name, command in group.commands.items():
            yield name, command
            if hasattr(command, "commands"):
                yield from commands(command)

    with_params = {
        name
        for name, command in commands(get_command(app))
        if any(p.name == "params" for p in command.params)
    }
    assert with_params | {"heads"} == set(SECTIONS)


def test_a_misspelt_section_is_refused_a_users_own_is_not(tmp_path):
    from pipeline.io.params import load_section

    p = tmp_path / "p.yaml"
    p.write_text("extrac:\n  stride: 8\ntraining:\n  epochs: 3\nhead:\n  note: mine\n")
    with pytest.raises(ConfigError, match=r"has no `extract:` section but has `extrac:`"):
        load_section(p, "extract", {"stride", "sites"})
    assert load_section(p, "train", {"seed", "timesteps"}) == {}  # training: is the user's
    assert load_section(p, "heads") == {}  # head: holds no recipes
    p.write_text("head:\n  film: {width: 8}\n")
    with pytest.raises(ConfigError, match=r"has no `heads:` section but has `head:`"):
        load_section(p, "heads")
    p.write_text("context:\n  components: 5\ncontxt:\n  windows: [7]\ncontex:\n  mine: 1\n")
    with pytest.raises(ConfigError, match=r"has `contxt:` beside `context:`"):
        load_section(p, "context", {"components", "windows"})
    p.write_text("context:\n  components: 5\ncontex:\n  windows: [7]\n  mine: 1\n")
    assert load_section(p, "context", {"components", "windows"}) == {"components": 5}


def test_compare_names_the_heads_section_not_a_flag(runner, tmp_path):
    (tmp_path / "p.yaml").write_text("heds:\n  film: {width: 8}\n")
    result = runner.invoke(app, ["compare", "--scene", "s.zarr", "--heads", "film",
                                 "--params", str(tmp_path / "p.yaml")])  # fmt: skip
    assert result.exit_code == 2
    assert "has no `heads:` section but has `heds:`" in result.stderr, result.stderr
