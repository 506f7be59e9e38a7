"""The layers of the code: the core never imports a pass, and a pass imports only the
core (and its own modules), never another pass."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "onnxcompress"
TOP = {"cli", "console", "api", "search", "search_int8", "trials", "registry", "__init__", "__main__", "plot"}  # may use passes


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the onnxcompress modules ``path`` imports (anywhere in it)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n.startswith("onnxcompress"))
    return out


def _pass_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "passes" else None


def import_graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_the_core_never_imports_a_pass() -> None:
    for mod, deps in import_graph().items():
        top = mod.split(".")[1] if "." in mod else "__init__"
        if top in TOP or top == "passes":
            continue
        assert not any(d.startswith("onnxcompress.passes") for d in deps), (mod, sorted(deps))


def test_a_pass_imports_no_other_pass() -> None:
    graph = import_graph()
    assert any(_pass_of(m) for m in graph)
    for mod, deps in graph.items():
        own = _pass_of(mod)
        if own is None:
            continue
        others = {_pass_of(d) for d in deps} - {None, own}
        assert not others, (mod, sorted(d for d in deps if _pass_of(d) in others))


#: distribution name → the top-level module it is imported as, where they differ
_IMPORT_NAME = {"onnxruntime-gpu": "onnxruntime", "pillow": "PIL", "protobuf": "google"}


def _third_party_imports(root: Path) -> set[str]:
    out: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                out.update(a.name.split(".")[0] for a in node.names)
    return {m for m in out if m not in sys.stdlib_module_names and m != "onnxcompress"}


def test_declared_means_imported_and_imported_means_declared() -> None:
    """Every dependency in pyproject.toml (the extras included) is imported by the package
    or its tests, and every third-party module the package imports is declared."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    declared = {re.split(r"[<>=;\[ ]", s, maxsplit=1)[0].strip().lower() for s in specs}
    as_imported = {_IMPORT_NAME.get(d, d) for d in declared}
    used = _third_party_imports(PKG)
    assert used <= as_imported, sorted(used - as_imported)
    unused = as_imported - used - _third_party_imports(PKG.parent / "tests")
    assert not unused, sorted(unused)
