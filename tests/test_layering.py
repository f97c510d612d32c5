"""The package's import arrows point one way: no module of ``edfkern/`` imports, directly or through
others, a module that imports it back. Function-level imports count too (they are arrows all the
same), and so do ``from package import module`` forms. The implicit import of a parent package's
``__init__`` does not: every submodule has that arrow.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "edfkern")


def _modules() -> dict[str, str]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its body."""
    is_pkg = path.endswith("__init__.py")
    here = name if is_pkg else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif target in modules:
                    out.add(target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle, as a path ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def _is_package_init_arrow(a: str, b: str) -> bool:
    """``edfkern.ops.dae`` -> ``edfkern``: a module importing a package that encloses it (the package's
    ``__init__`` runs first anyway)."""
    return a.startswith(b + ".")


def test_no_import_circle() -> None:
    graph = {m: {n for n in deps if not _is_package_init_arrow(m, n)} for m, deps in _graph().items()}
    # the top-level package re-exports the public API, so every module below it is reachable from it;
    # its own arrows are fine, a module importing ``edfkern`` itself (outside a package-init arrow) is not
    cycle = _cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_checker_finds_a_circle() -> None:
    """The checker above can fail: a two-module circle and a relative ``from . import x`` are found."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = _graph()
    assert "edfkern._checks" in graph["edfkern.ops.dae"]          # from .. import _checks as C
    assert "edfkern.distributed._comm" in graph["edfkern.ops.cpd"]  # from ..distributed._comm import ...


@pytest.mark.parametrize("lower,upper", [("edfkern.distributed", "edfkern.ops"), ("edfkern.ops", "edfkern.optim"),
                                         ("edfkern.ops", "edfkern.trajectory")])
def test_layers(lower: str, upper: str) -> None:
    """``distributed`` sits below ``ops``; ``optim`` and ``trajectory`` above them."""
    graph = _graph()
    bad = sorted(f"{m} -> {n}" for m, deps in graph.items() if m == lower or m.startswith(lower + ".")
                 for n in deps if n == upper or n.startswith(upper + "."))
    assert not bad, f"{lower} must not import {upper}: {bad}"


def test_no_source_file_is_ignored_by_git() -> None:
    """A source file git ignores is missing from every clone (``edfkern/build/__main__.py`` once was,
    caught by ``build/`` in .gitignore): no ``.py``, C++ or CUDA file of the repository is ignored."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and \
            not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: nothing decides what a clone holds")
    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", "edfkern", "tests",
                          "tools", "csrc", "python", "benchmarks", "setup.py"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    ignored = [f for f in out if f.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".sh")) and "__pycache__" not in f]
    assert not ignored, f"source files ignored by git (absent from a clone): {ignored}"
    # on a clean clone the ignored file is simply absent; its committed neighbours still match the rule
    tracked = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not tracked, f"committed files that .gitignore matches (a new file beside them is left out): {tracked}"


def test_build_command_runs() -> None:
    """``python -m edfkern.build`` (the ahead-of-time build) is a runnable module."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "edfkern.build", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--force" in p.stdout, p.stdout + p.stderr
