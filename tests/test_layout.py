"""The one-way house: sr3d's modules import each other without cycles, and only downwards in the
order README.md's Layout section lists them (bottom up).

The import graph is read from the source with `ast`, so it holds every import a module can run:
top-level, lazy ones inside functions and those under `if TYPE_CHECKING:`.
"""
import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sr3d"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """sr3d module -> the sr3d modules it imports (a package for a name taken from its __init__)."""
    paths = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

    def module_of(name: str) -> str:
        while name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imported |= {module_of(a.name) for a in node.names if a.name.split(".")[0] == "sr3d"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..io import y
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "sr3d":
                    # `from sr3d import inference` imports the module sr3d.inference;
                    # `from sr3d.progress import Step` imports sr3d.progress.
                    imported |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else module_of(base)
                                 for a in node.names}
        graph[name] = imported - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None if it is acyclic."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return None


def _layout_order() -> list[str]:
    """The sr3d modules and packages README.md's Layout section names, bottom up."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Layout\n"):]
    section = section[:section.index("\n## ", 1)]
    names = [_module_name(REPO / (n if n.endswith(".py") else n.rstrip("/") + "/__init__.py"))
             for n in re.findall(r"`(sr3d/[\w/]+?(?:\.py|/))`", section)]
    return list(dict.fromkeys(names))


def test_the_scan_sees_lazy_imports_and_finds_cycles():
    graph = _import_graph()
    assert "sr3d.upscaling" in graph["sr3d.inference"]   # top-level: from sr3d.upscaling import ...
    assert "sr3d.models" in graph["sr3d.upscaling"]       # lazy, inside upscale_normalised
    assert "sr3d.io.common" in graph["sr3d.io.nifti"]     # inside a package
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = _cycle(_import_graph())
    assert cycle is None, f"import cycle among sr3d modules: {' -> '.join(cycle)}"


def test_imports_go_down_the_readme_layout():
    """Every module is listed in README's Layout section, and imports only modules listed before
    it (or its own package's). The package root `sr3d` is not checked as an import: Python runs
    sr3d/__init__.py before any sr3d module anyway (sr3d.evaluation.run reads `sr3d.__version__`),
    and its only sr3d import, of inference, is lazy inside `sr3d.upscale`."""
    order = _layout_order()
    rank = {name: i for i, name in enumerate(order)}
    graph = _import_graph()

    def listed(module: str) -> str:
        """The Layout entry of `module`: itself or its package; "sr3d" (the root) if neither is listed."""
        while module != "sr3d" and module not in rank:
            module = module.rpartition(".")[0]
        return module

    # sr3d/__main__.py (`python -m sr3d`) goes with the package root it belongs to.
    unlisted = sorted(m for m in graph if m not in ("sr3d", "sr3d.__main__") and listed(m) == "sr3d")
    assert unlisted == [], f"sr3d modules missing from README.md's Layout section: {unlisted}"
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if target != "sr3d" and listed(module) != listed(target)
                    and rank[listed(target)] > rank[listed(module)])
    assert upward == [], f"imports of modules listed later in README.md's Layout: {upward}"
