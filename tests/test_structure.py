"""The import structure holds: no circles, config and policies stand alone, the simulator is a
leaf, and attribution and policies stay pure (no I/O, no clock reads).

Imports are read with `ast` (nothing is imported), at module level and inside functions alike:
an import deferred into a function is still a dependency, only a hidden one. Imports under
`if TYPE_CHECKING:` never run, so they are left out of the cycle check (annotations may name a
module that imports this one).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "policies")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(*top: str) -> dict[str, Path]:
    """Module name -> file, for every .py file under the given top-level folders."""
    return {_module_name(p): p for t in top for p in sorted((ROOT / t).rglob("*.py"))}


MODULES = _modules(*PACKAGES)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    return {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
            and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for stmt in node.body for inner in ast.walk(stmt)}


def _imports(name: str, path: Path, *, typing_too: bool = True) -> set[str]:
    """Every module `name` imports, absolute, anywhere in the file; `typing_too=False` leaves
    out the imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = set() if typing_too else _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from proxy.energy import sources` imports the module proxy.energy.sources
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def _own(imported: str) -> str | None:
    """The project module an import resolves to (a name inside a module -> that module)."""
    while imported:
        if imported in MODULES:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = {own for imp in _imports(name, path, typing_too=False)
                       if (own := _own(imp)) and own != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_sees_a_cycle() -> None:
    """The check above would notice a circle, including one through a deferred import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_imports_nothing_of_the_proxy() -> None:
    own = {i for i in _imports("proxy.config", MODULES["proxy.config"]) if i.split(".")[0] in PACKAGES}
    assert own == set()


def test_only_the_command_line_imports_the_simulator() -> None:
    allowed = {"proxy.cli"}
    offenders = sorted(
        name for name, path in MODULES.items()
        if name not in allowed and not name.startswith("proxy.sim")
        and any(i == "proxy.sim" or i.startswith("proxy.sim.") for i in _imports(name, path)))
    assert offenders == []


def test_policies_do_not_import_the_proxy() -> None:
    offenders = sorted(
        name for name, path in MODULES.items() if name.startswith("policies")
        and any(i.split(".")[0] == "proxy" for i in _imports(name, path)))
    assert offenders == []


#: I/O and clock reads a pure module must not make: calls of `time.*`, `open(`, and the
#: asyncio / HTTP / Redis libraries, whether imported or used by name.
_IMPURE = re.compile(r"\btime\.|(?<![\w.])open\(|\basyncio\b|\baiohttp\b|\bhttpx\b|\bredis\b")


def _impure_lines(path: Path) -> list[str]:
    """Lines of code (docstrings and comments left out) that do I/O or read a clock."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)}
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] in ("time", "asyncio", "aiohttp", "httpx", "redis") for n in names):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and id(node) not in docstrings:
            text = ast.unparse(node.func) + "("
            if _IMPURE.search(text):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and _IMPURE.search(ast.unparse(node)):
            bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(bad))


def test_attribution_and_policies_are_pure() -> None:
    pure = [p for n, p in MODULES.items()
            if n.startswith(("proxy.energy.attribution", "policies"))]
    assert pure
    assert [line for p in pure for line in _impure_lines(p)] == []


def test_purity_check_sees_clock_reads_and_io(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""Reads time.time() -- in a docstring, fine."""\n'
                      "import time\n\ndef f():\n    # open( in a comment is fine\n"
                      "    return time.monotonic(), open('x')\n")
    lines = _impure_lines(sample)
    assert any("import time" in line for line in lines)
    assert any("time.monotonic" in line for line in lines)
    assert any("open('x')" in line for line in lines)
    assert not any(":1:" in line for line in lines)
