"""The layout holds: dvc.yaml's code deps are each stage's real import graph, the subpackages'
public APIs resolve and load lazily, and the library imports from defining modules only."""

from __future__ import annotations

import ast
import copy
import importlib
import subprocess
import sys

import pytest
import yaml

from tests.import_graph import REPO, command_deps, module_file

PACKAGES = ("utils", "io", "scene", "backbone", "features", "heads", "evaluation")


def _stage_defs(dvc: dict) -> dict[str, dict]:
    """Each stage's definition (a ``foreach`` stage's ``do``)."""
    return {name: spec.get("do", spec) for name, spec in dvc["stages"].items()}


def deps_mismatch(dvc: dict) -> dict[str, tuple[set[str], set[str]]]:
    """Per stage whose code deps differ from its command's import graph: (missing, extra)."""
    wrong = {}
    for name, spec in _stage_defs(dvc).items():
        command = spec["cmd"].split()[1]
        listed = {d for d in spec.get("deps", []) if not d.startswith("cache/")}
        needed = command_deps(command)
        if listed != needed:
            wrong[name] = (needed - listed, listed - needed)
    return wrong


def test_dvc_deps_are_each_stages_import_graph():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert deps_mismatch(dvc) == {}


def test_the_dep_check_catches_a_removed_and_an_unused_dep():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    broken = copy.deepcopy(dvc)
    deps = broken["stages"]["train"]["do"]["deps"]
    deps.remove("pipeline/heads")
    broken["stages"]["prepare"]["deps"].append("pipeline/backbone")
    assert deps_mismatch(broken) == {
        "train": ({"pipeline/heads"}, set()),
        "prepare": (set(), {"pipeline/backbone"}),
    }


def test_a_stage_depends_on_what_it_imports_and_nothing_else():
    # the walk of the data shows in the deps: a scene needs no model, a head no backbone code
    assert "pipeline/backbone" not in command_deps("prepare")
    assert "pipeline/heads" not in command_deps("extract")
    assert "pipeline/backbone" not in command_deps("train")
    assert {"pipeline/heads", "pipeline/features", "pipeline/scene"} <= command_deps("evaluate")


@pytest.mark.parametrize("package", PACKAGES)
def test_package_api_resolves(package):
    pkg = importlib.import_module(f"pipeline.{package}")
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, f"pipeline.{package}.{name}"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_api_exports_each_modules_public_names(package):
    pkg = importlib.import_module(f"pipeline.{package}")
    submodules = {p.stem for p in (REPO / "pipeline" / package).glob("*.py")} - {"__init__"}
    for sub in submodules:
        names = set(getattr(importlib.import_module(f"pipeline.{package}.{sub}"), "__all__", []))
        assert names - submodules <= set(pkg.__all__), f"pipeline.{package}.{sub}"


def test_registry_and_command_line_load_without_torch():
    code = (
        "import sys, stages.cli, pipeline.heads.registry, pipeline.scene.splits\n"
        "heavy = {'torch', 'diffusers', 'sklearn'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _our_sources():
    for folder in ("pipeline", "stages"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_library_and_commands_import_from_defining_modules():
    # a name taken from a lazy package's __init__ would hide the real edge from the dep check
    wrong = []
    for path in _our_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                init = module_file(node.module)
                if init is None or init.name != "__init__.py":
                    continue
                for alias in node.names:
                    if module_file(f"{node.module}.{alias.name}") is None:
                        wrong.append(f"{path.relative_to(REPO)}: {node.module}.{alias.name}")
    assert wrong == []


def test_library_never_imports_the_commands():
    wrong = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            wrong += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("stages")]
    assert wrong == []
