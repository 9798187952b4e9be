"""The package's shape, read from its source with ``ast`` (nothing is imported):

- no import cycle among avel modules (module-level imports: what runs when a module is imported);
- layers only look down: (base) -> (data, features) -> models -> (tasks, compat) -> engine -> inference
  -> viz -> demo -> cli, and in particular data, models and features never import cli or engine;
- no import inside a function anywhere in avel (none dodges a cycle), except the one marked lazy place:
  a package ``__getattr__`` (``avel.Localizer`` loads PyAV and the backbones only when asked for);
- no ``print`` or ``sys.exit`` outside ``avel/cli/``: the library returns values and raises errors.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "avel"

# Layer of each top-level part of the package; a module may import its own layer and those below.
LAYERS = [
    {"_version", "io", "layout", "spec", "card", "config", "metrics"},
    {"data", "features"},
    {"models"},
    {"tasks", "compat"},
    {"engine"},
    {"inference"},
    {"viz"},
    {"demo"},
    {"cli", "__main__"},           # __main__: ``python -m avel``, the command line's entry point
]
COMMAND_LINE = ("avel.cli", "avel.__main__")
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}
LAZY_PLACES = {"__getattr__"}       # package __getattr__: the marked place for optional heavy imports


@dataclass(frozen=True)
class Import:
    source: str          # importing module, e.g. avel.features.extract.job
    target: str          # imported avel module
    line: int
    in_function: bool
    function: str = ""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _targets(node, name: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "avel" or a.name.startswith("avel.")]
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        if node.module:
            base += node.module.split(".")
        base = ".".join(base)
    else:
        base = node.module or ""
        if not (base == "avel" or base.startswith("avel.")):
            return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else base)
    return out


def _walk(node, name: str, is_package: bool, known: set[str], function: str | None, found: list[Import]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _walk(child, name, is_package, known, function or getattr(child, "name", "<lambda>"), found)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            targets = _targets(child, name, is_package, known)
            if function is not None and not targets:
                targets = [f"<external> {ast.unparse(child)}"]
            for t in targets:
                if t != name:
                    found.append(Import(name, t, child.lineno, function is not None, function or ""))
        _walk(child, name, is_package, known, function, found)


def imports() -> list[Import]:
    mods = modules()
    found: list[Import] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        _walk(tree, name, path.name == "__init__.py", set(mods), None, found)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_walk_sees_the_package():
    mods = modules()
    assert {"avel", "avel.cli", "avel.features.registry", "avel.inference.localizer"} <= set(mods)
    edges = {(i.source, i.target) for i in imports() if not i.in_function}
    assert ("avel.features.backbones.vgg", "avel.features.registry") in edges
    assert ("avel.features", "avel.features.backbones") in edges


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for i in imports():
        if not i.in_function:
            graph.setdefault(i.source, set()).add(i.target)
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_lower_layers_never_import_cli_or_engine():
    bad = [f"{i.source}:{i.line} imports {i.target}" for i in imports()
           if _part(i.source) in ("data", "models", "features") and _part(i.target) in ("cli", "engine")]
    assert not bad, "\n".join(bad)


def test_layers_only_look_down():
    bad = []
    for i in imports():
        src, dst = _part(i.source), _part(i.target)
        if src == "__init__" or dst == "__init__" or i.target.startswith("<external>"):
            continue             # the package root is the public API over every layer
        if LAYER[dst] > LAYER[src]:
            bad.append(f"{i.source}:{i.line} ({src}, layer {LAYER[src]}) imports {i.target} (layer {LAYER[dst]})")
    assert not bad, "\n".join(bad)


def test_no_function_level_imports():
    bad = [f"{i.source}:{i.line} in {i.function}(): {i.target}" for i in imports()
           if i.in_function and not (i.function in LAZY_PLACES and modules()[i.source].name == "__init__.py")]
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)


def test_no_print_or_exit_outside_cli():
    bad = []
    for name, path in modules().items():
        if name in COMMAND_LINE or name.startswith("avel.cli."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("print", "exit", "quit"):
                    bad.append(f"{name}:{node.lineno}: {f.id}(")
                if isinstance(f, ast.Attribute) and f.attr in ("exit", "_exit") and \
                        isinstance(f.value, ast.Name) and f.value.id in ("sys", "os"):
                    bad.append(f"{name}:{node.lineno}: {f.value.id}.{f.attr}(")
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    bad.append(f"{name}:{node.lineno}: raise SystemExit")
    assert not bad, "only avel/cli/ prints and exits:\n" + "\n".join(bad)
