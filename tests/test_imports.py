"""The package's imports point one way: no cycle between modules, nothing imports
``antlm_dist.bench``, and no library module imports a command-line module. Also: no
function of ``antlm_dist/`` is much longer than one screen.

Imports are read with ``ast`` from the source files (module level and inside functions
alike), without importing anything. ``kernels/`` is installed as ``antlm_dist.kernels``,
``recipes/`` and ``ds_configs/`` likewise.
"""
from __future__ import annotations

import ast
from pathlib import Path

from antlm_testutil import REPO

PACKAGE_DIRS = {"antlm_dist": REPO / "antlm_dist", "antlm_dist.kernels": REPO / "kernels",
                "antlm_dist.recipes": REPO / "recipes", "antlm_dist.ds_configs": REPO / "ds_configs"}
CLI_MODULES = {"antlm_dist.cli", "antlm_dist.train", "antlm_dist.eval.cli", "antlm_dist.bench.cli", "antlm_dist.export_cli",
               "antlm_dist.study.cli"}
"""Modules that are console entry points (``antlm_dist.checkpoint`` has a small ``main`` too,
but it is a library module first)."""
COMMAND_PACKAGES = ("antlm_dist.bench", "antlm_dist.study")
"""Packages that sit on top of the others and run their commands (antlm-bench times the
trainer's step; antlm-study runs antlm-train, antlm-export and antlm-eval): they may import
CLI modules, and only the console dispatcher ``antlm_dist.cli`` imports them."""


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of the installed package."""
    mods = {}
    for prefix, root in PACKAGE_DIRS.items():
        for f in root.rglob("*.py"):
            if "demo_corpus" in f.parts:
                continue
            rel = f.relative_to(root).with_suffix("").parts
            if prefix == "antlm_dist" and rel[0] in ("kernels", "recipes", "ds_configs"):
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            mods[".".join((prefix, *parts))] = f
    return mods


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_absolute_imports():
    graph = import_graph()
    assert "antlm_dist.kernels.backend" in graph["antlm_dist.kernels.flash_attention"]  # from .backend import …
    assert "antlm_dist.trainer" in graph["antlm_dist.train"]
    assert "antlm_dist.checkpoint" in graph["antlm_dist.export"]  # from antlm_dist import checkpoint as ckpt


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with every subpackage of ``antlm_dist`` collapsed to one node
    (``antlm_dist.data.blocks`` → ``antlm_dist.data``); top-level modules stay as they are."""

    def node(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(node(m), set()).update(node(d) for d in deps if node(d) != node(m))
    return out


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert find_cycles(graph) == []
    assert find_cycles(package_graph(graph)) == []  # e.g. train -> eval.heldout and eval.cli -> train


def test_nothing_imports_bench_and_no_library_module_imports_a_cli_module():
    graph = import_graph()
    for package in COMMAND_PACKAGES:
        # antlm_dist.cli is the console-script dispatcher: it starts antlm-bench and antlm-study, nothing else may
        into = {m: sorted(d for d in deps if d.startswith(package))
                for m, deps in graph.items() if not m.startswith(package) and m != "antlm_dist.cli"}
        assert {m: d for m, d in into.items() if d} == {}, package
    into_cli = {m: sorted(deps & CLI_MODULES) for m, deps in graph.items()
                if m not in CLI_MODULES and not m.startswith(COMMAND_PACKAGES)}
    assert {m: d for m, d in into_cli.items() if d} == {}
    assert not graph["antlm_dist.train"] & (CLI_MODULES - {"antlm_dist.train"})
    assert not any(d.startswith("antlm_dist") for d in graph["antlm_dist.kernels.backend"])


MAX_FUNCTION_LINES = 72
"""About one screen: 60 lines of code, plus a docstring that gives shapes and errors."""


def test_no_function_in_antlm_dist_is_much_over_60_lines():
    long = {}
    for f in (REPO / "antlm_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{f.relative_to(REPO)}:{node.name}"] = n
    assert long == {}
