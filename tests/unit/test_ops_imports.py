"""The modules of tinymlaas/ops import each other in one direction only: helpers <- converter families <- the package
(tinymlaas/ops/__init__.py); and no module of the project (its benchmarks and tests included) takes a private
name from another one."""

import ast
from pathlib import Path

from tinymlaas import PROJECT_ROOT

OPS = PROJECT_ROOT / "tinymlaas" / "ops"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import statement of the file, function-level ones included; relative imports
    resolved to absolute module names."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [a.name for a in node.names], node.lineno))
    return found


def ops_graph() -> dict[str, set[str]]:
    """ops module (file stem, '__init__' for the package) -> the ops modules it imports."""
    stems = {p.stem for p in OPS.glob("*.py")} - {"__init__"}
    graph = {}
    for path in sorted(OPS.glob("*.py")):
        targets = set()
        for module, names, _ in _imports(path):
            dotted = [module] + [f"{module}.{n}" for n in names]  # `from tinymlaas.ops import int8` names a module
            for d in dotted:
                parts = d.split(".")
                if parts[:2] == ["tinymlaas", "ops"] and len(parts) > 2 and parts[2] in stems:
                    targets.add(parts[2])
        graph[path.stem] = targets - {path.stem}
    return graph


def families() -> set[str]:
    """The converter modules: those that register converters (`@register(...)`)."""
    found = set()
    for path in OPS.glob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        if path.stem != "registry" and any(isinstance(c.func, ast.Name) and c.func.id == "register" for c in calls):
            found.add(path.stem)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Modules that import each other in a circle (the first one repeated at the end), or None."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, stack + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_ops_modules_import_in_one_direction():
    graph = ops_graph()
    assert find_cycle(graph) is None, f"import cycle in tinymlaas/ops: {' -> '.join(find_cycle(graph))}"
    fams = families()
    assert {"float32", "int8", "int16", "movement", "recurrent", "detection"} <= fams
    for name in sorted(set(graph) - {"__init__"}):  # families and helpers alike
        assert not graph[name] & fams, f"{name}.py imports the converter families {sorted(graph[name] & fams)}"
    assert graph["registry"] == set(), "registry.py imports nothing of tinymlaas/ops: the families import it"
    assert graph["__init__"] == fams, "the package imports every converter family (that fills the registry)"


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for top in ("tinymlaas", "server", "benchmarks", "tests"):
        for path in sorted((PROJECT_ROOT / top).rglob("*.py")):
            for module, names, line in _imports(path):
                private = [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
                if private and module != "__future__":
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{line}: from {module} import {', '.join(private)}")
    assert not offenders, "\n".join(offenders)
