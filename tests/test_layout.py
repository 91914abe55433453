"""The house rules, read from the source (AST, nothing imported): common/ imports no stage, no stage imports the
img2vec tools, only train/__main__.py imports the training loop, product files and functions fit a screen, and
docs/read_cache.py needs nothing but the standard library, numpy and numcodecs."""
from __future__ import annotations

import ast
import functools
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
STAGES = ("shards", "extract", "train", "img2vec")
PACKAGES = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def product_files() -> list[Path]:
    """Every module of the installed packages (pyproject's packages; not tests/, bench/ or docs/)."""
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 40 and {p.relative_to(REPO).parts[0] for p in files} == set(PACKAGES)
    return files


@functools.cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.cache
def imports(path: Path) -> frozenset[str]:
    """The dotted modules `path` imports anywhere (inside functions too), relative imports resolved; a
    `from a import b` counts as a and a.b (b may be a module); importlib.import_module("x") counts as x."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return frozenset(found)


def top(module: str) -> str:
    return module.split(".")[0]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_common_imports_no_stage():
    bad = [f"{rel(p)}: {m}" for p in (REPO / "common").rglob("*.py") for m in sorted(imports(p)) if top(m) in STAGES]
    assert not bad, "common/ holds the pure pieces and imports no stage package:\n" + "\n".join(bad)


def test_no_stage_imports_the_tools():
    bad = [f"{rel(p)}: {m}" for p in product_files() if p.relative_to(REPO).parts[0] != "img2vec"
           for m in sorted(imports(p)) if top(m) == "img2vec"]
    assert not bad, "img2vec/ is the top of the house; nothing below imports it:\n" + "\n".join(bad)


def test_only_the_train_command_imports_the_training_loop():
    bad = [rel(p) for p in product_files() if rel(p) != "train/__main__.py"
           and any(m == "train.loop" or m.startswith("train.loop.") for m in imports(p))]
    assert not bad, "train.loop is imported by train/__main__.py alone (build_student lives in train/model.py):\n" + \
        "\n".join(bad)


def test_product_files_and_functions_fit_a_screen():
    long_files, long_functions = [], []
    for p in product_files():
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES:
            long_files.append(f"{rel(p)}: {n} lines")
        for node in ast.walk(tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel(p)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files + long_functions, (
        f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function (split it by concern):\n"
        + "\n".join(long_files + long_functions))


@pytest.mark.parametrize("script", ["docs/read_cache.py"])
def test_the_format_reader_needs_only_stock_packages(script):
    allowed = set(sys.stdlib_module_names) | {"numpy", "numcodecs"}
    found = imports(REPO / script)
    assert found, "no imports found: the test reads the wrong file"
    bad = sorted(m for m in found if top(m) not in allowed)
    assert not bad, f"{script} reads a cache with the standard library, numpy and numcodecs only; it imports {bad}"
