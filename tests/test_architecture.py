"""The rooms of docs/architecture.md and their import rules, read from the source (imports inside functions
included): the lower rooms never import torch, transformers, export/ or cli.py, and there are no cycles."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "segllm_edge"
# web/cli.py is not here: it builds the tiny checkpoint when given no model
TORCH_FREE = ("contracts", "pipeline", "runtime", "serving", "client.py", "errors.py", "extras.py", "limits.py",
              "drawing.py", "process_memory.py", "web/app.py", "web/conversations.py")
TORCH_ALLOWED = {
    "runtime/trt_backend.py",   # the TensorRT backend keeps its device buffers in torch CUDA tensors (GPU only)
    "contracts/engines.py",     # current_device(): the GPU's name and compute capability, when building/loading engines
    "pipeline/tokenizer.py",    # a checkpoint with only tokenizer.model (no tokenizer.json) needs transformers
}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from . import api` imports a module
    return out


SOURCES = {_module(p): p for p in PKG.rglob("*.py")}


def _room_files(room: str):
    p = PKG / room
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("room", TORCH_FREE)
def test_lower_rooms_import_no_torch_export_or_cli(room):
    bad = []
    for f in _room_files(room):
        rel = str(f.relative_to(PKG))
        for name in _imports(f):
            top = name.split(".")[0]
            if top in ("torch", "transformers") and rel not in TORCH_ALLOWED:
                bad.append(f"{rel}: {name}")
            if name.startswith(("segllm_edge.export", "segllm_edge.cli", "segllm_edge.modeling", "segllm_edge.tiny")):
                bad.append(f"{rel}: {name}")
    assert not bad, "imports that break the layering:\n" + "\n".join(sorted(bad))


def test_export_never_imports_cli():
    bad = [f"{f.relative_to(PKG)}: {n}" for f in _room_files("export") for n in _imports(f)
           if n.startswith("segllm_edge.cli")]
    assert not bad, bad


def _graph():
    graph = {}
    for mod, path in SOURCES.items():
        deps = set()
        for name in _imports(path):
            while name and name not in SOURCES:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + "."):  # a package's own __init__ is no edge
                deps.add(name)
        graph[mod] = deps
    return graph


def _cycles(graph):
    seen, stack, on, found = set(), [], set(), []

    def visit(m):
        seen.add(m)
        stack.append(m)
        on.add(m)
        for d in sorted(graph.get(m, ())):
            if d in on:
                found.append(stack[stack.index(d):] + [d])
            elif d not in seen:
                visit(d)
        stack.pop()
        on.discard(m)

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    return found


def test_no_import_cycles():
    assert not _cycles(_graph()), _cycles(_graph())


def test_export_never_imports_the_runtime():
    """The drift report is handed a loader (export/drift.py DriftProbe); only the export CLI command, which
    builds that loader from segllm_edge.load, reaches the runtime (through the package's front door)."""
    bad = [f"{f.relative_to(PKG)}: {n}" for f in _room_files("export") for n in _imports(f)
           if n.startswith(("segllm_edge.runtime", "segllm_edge.api", "segllm_edge.cli")) or
           (n == "segllm_edge" and f.name != "cli.py")]
    assert not bad, bad
