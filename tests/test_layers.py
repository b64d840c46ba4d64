"""The layer rules of the repository, checked on the source with `ast` (no module is imported).

    cli -> {cosa, export, serving}; export -> cosa; serving -> cosa and, of export, only the small
    modules in `SERVING_MAY_IMPORT`; cosa (the core) imports neither export nor serving nor the
    CLI; export never imports serving. No import cycles (serving's rule, held project-wide).
    Triton's python-backend models import nothing from the project (they run in Triton's stub).

Every import counts, including those inside functions and under `TYPE_CHECKING`: a lazy import is
still a dependency (it only moves the cost), and the cycle the layers once had went through one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> installed package (pyproject.toml `package-dir`).
PACKAGES = {
    "cosa": "cosa",
    "export": "cosa.export",
    "serving": "cosa.serving",
    "triton_models": "cosa.triton_models",
}
CORE_FORBIDDEN = ("cosa.export", "cosa.serving", "cosa.triton_models", "cosa.app")
SERVING_MAY_IMPORT = frozenset(
    {
        "cosa.export.spec",  # the spec.json sidecar: tensor names, classes, palette
        "cosa.export.layout",  # the artifact chooser: which file of an export folder runs
        "cosa.export.tensorrt_engine",  # the TensorRT engine session
    }
)
PYTHON_BACKEND_MODELS = ("onnxruntime_model.py", "preprocess_model.py", "postprocess_model.py")
GPU_ONLY = ("tensorrt", "pycuda", "cuda")  # imported inside the function that needs them


def _module_name(path: Path) -> str:
    if path == ROOT / "cli.py":
        return "cosa.app.cli"
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = {ROOT / "cli.py"}
    for folder in PACKAGES:
        files.update((ROOT / folder).rglob("*.py"))
    return {_module_name(p): p for p in sorted(files)}


SOURCES = _sources()


def _imports(module: str, path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in `path`, relative ones
    resolved; `from package import name` yields `package.name` when that is a module here."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in SOURCES else base
                yield target, node.lineno, id(node) in top_level


GRAPH = {m: sorted(set(_imports(m, p))) for m, p in SOURCES.items()}


def _internal(module: str) -> dict[str, int]:
    """Project modules `module` imports -> first line."""
    out: dict[str, int] = {}
    for target, line, _ in GRAPH[module]:
        if target.startswith("cosa.") or target == "cosa":
            out.setdefault(target, line)
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> str:
    for name in ("cosa.app", "cosa.export", "cosa.serving", "cosa.triton_models"):
        if _in(module, name):
            return name
    return "cosa"


def test_the_sources_are_found() -> None:
    assert {"cosa.app.cli", "cosa.images", "cosa.export.spec", "cosa.serving.runners"} <= set(
        SOURCES
    )
    assert ("cosa.errors", 1) in {(t, 1) for t, _, _ in GRAPH["cosa.serving.runners"]}


def _violations(layer: str, allowed: object) -> list[str]:
    found = []
    for module in SOURCES:
        if _layer(module) != layer:
            continue
        for target, line in _internal(module).items():
            if not allowed(target):  # type: ignore[operator]
                found.append(f"{SOURCES[module].relative_to(ROOT)}:{line} imports {target}")
    return found


def test_the_core_imports_neither_export_nor_serving_nor_the_cli() -> None:
    assert _violations("cosa", lambda t: not any(_in(t, f) for f in CORE_FORBIDDEN)) == []


def test_export_never_imports_serving_or_the_cli() -> None:
    forbidden = ("cosa.serving", "cosa.app", "cosa.triton_models")
    assert _violations("cosa.export", lambda t: not any(_in(t, f) for f in forbidden)) == []


def test_serving_reaches_export_only_through_its_small_modules() -> None:
    def allowed(target: str) -> bool:
        if _in(target, "cosa.app"):
            return False
        return not _in(target, "cosa.export") or target in SERVING_MAY_IMPORT

    assert _violations("cosa.serving", allowed) == []


def test_the_modules_serving_may_import_stay_small() -> None:
    # What they import from export must itself be on the list, or serving reaches the rest of
    # export (torch, onnx) through them.
    found = [
        f"{module} imports {target}"
        for module in SERVING_MAY_IMPORT & set(SOURCES)
        for target in _internal(module)
        if _in(target, "cosa.export") and target not in SERVING_MAY_IMPORT
    ]
    assert found == []


def _cycles(modules: set[str]) -> list[list[str]]:
    """Every elementary cycle's representative (one per strongly connected component)."""
    edges = {m: [t for t in _internal(m) if t in modules and t != m] for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return components


def test_no_import_cycles() -> None:
    # Required of serving (issue 14); it holds for the whole project, so it is kept there.
    assert _cycles(set(SOURCES)) == []


def test_cycle_finder_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check above cannot pass vacuously: the circle the layers once had (the client importing
    # the repository writer for names, the writer importing the runners) is found.
    patched = dict(GRAPH)
    patched["cosa.serving.triton_client"] = [
        *GRAPH["cosa.serving.triton_client"],
        ("cosa.serving.triton_repo", 1, True),
    ]
    patched["cosa.serving.triton_repo"] = [
        *GRAPH["cosa.serving.triton_repo"],
        ("cosa.serving.runners", 1, True),
    ]
    monkeypatch.setitem(globals(), "GRAPH", patched)
    serving = {m for m in SOURCES if _in(m, "cosa.serving")}
    (cycle,) = _cycles(serving)
    assert {"cosa.serving.runners", "cosa.serving.triton_client"} <= set(cycle)


def test_python_backend_models_import_nothing_from_the_project() -> None:
    found = [
        f"{name}:{line} imports {target}"
        for name in PYTHON_BACKEND_MODELS
        for target, line in _internal(f"cosa.triton_models.{name.removesuffix('.py')}").items()
    ]
    assert found == []


def test_gpu_only_packages_are_imported_inside_functions() -> None:
    found = [
        f"{SOURCES[m].relative_to(ROOT)}:{line} imports {target} at module level"
        for m in SOURCES
        for target, line, top in GRAPH[m]
        if top and target.split(".")[0] in GPU_ONLY
    ]
    assert found == []
