"""The layers hold: the core (tiblocal/) never imports a stage (convert, quantize, finetune) or a pipeline; a stage
never imports a pipeline. Only the command line (tiblocal/cli.py), the top, dispatches to all of them. Every import
counts, also those inside functions (the stages import lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("convert", "quantize", "finetune")


def imported(path: Path) -> set[str]:
    """The absolute names of the tiblocal modules ``path`` imports (relative imports resolved)."""
    folders = list(path.relative_to(ROOT).parts[:-1])  # tiblocal/serve -> tiblocal.serve; convert -> tiblocal.convert
    package = ".".join(folders if folders[0] == "tiblocal" else ["tiblocal", *folders])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return {n for n in names if n == "tiblocal" or n.startswith("tiblocal.")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return "stage"
    if len(parts) > 1 and parts[1] == "pipelines":
        return "pipeline"
    return "core"


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return "core" if rel.parts[0] == "tiblocal" else ("pipeline" if rel.parts[0] == "pipelines" else "stage")


SOURCES = sorted(p for folder in ("tiblocal", *STAGES, "pipelines") for p in (ROOT / folder).rglob("*.py"))


def test_the_resolver_sees_lazy_and_relative_imports() -> None:
    assert "tiblocal.engine" in imported(ROOT / "tiblocal" / "chat.py")  # from .engine import ...
    assert "tiblocal.engine" in imported(ROOT / "tiblocal" / "serve" / "api.py")  # from ..engine import ...
    assert "tiblocal.pipelines.release" in imported(ROOT / "pipelines" / "commands.py")  # lazy, inside a function
    assert "tiblocal.quantize.gguf_quant" in imported(ROOT / "pipelines" / "release.py")
    assert layer("tiblocal.quantize.imatrix") == "stage" and layer("tiblocal.pipelines.release") == "pipeline"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    if path == ROOT / "tiblocal" / "cli.py":
        return  # the top: it dispatches to every layer
    own = _package_of(path)
    allowed = {"core": {"core"}, "stage": {"core", "stage"}, "pipeline": {"core", "stage", "pipeline"}}[own]
    wrong = sorted(n for n in imported(path) if layer(n) not in allowed)
    assert not wrong, f"{path.relative_to(ROOT)} ({own}) imports {wrong}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts) if rel.parts[0] == "tiblocal" else ["tiblocal", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circles() -> None:
    """No module reaches itself through the modules it imports (quantize/ had gguf_quant -> imatrix -> rotate ->
    gguf_quant)."""
    modules = {_module_name(p): p for p in SOURCES}
    edges = {m: {n for n in imported(p) if n in modules and n != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n] if n in path else [m, n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_tiblocal_gguf_keys_are_named_once() -> None:
    """tiblocal's own GGUF keys, llama.cpp's imatrix keys and the sampling group are written as text only in
    tiblocal/gguf_keys.py (gguf-py's are used from gguf-py): the other modules name them through it."""
    import re

    literal = re.compile(r"""["'](tiblocal\.(rotation|imatrix)\.|quantize\.imatrix\.|imatrix\.(datasets|chunk_)|general\.sampling\.)""")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in ROOT.rglob("*.py")
             if path.parts[len(ROOT.parts)] in ("tiblocal", "convert", "quantize", "finetune", "pipelines")
             and path.name != "gguf_keys.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if literal.search(line)]
    assert not found, found
