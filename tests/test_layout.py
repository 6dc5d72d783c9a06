"""The package's layout holds (docs/architecture.md): no import cycle, the layers import downwards only, SQL only
in the store, and the torch-free layers stay free of torch. Every import counts, also those inside functions."""

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "cerberus_histo"
SQL = re.compile(r"\b(SELECT\b.*\bFROM|INSERT INTO|REPLACE INTO|UPDATE \w+ SET|DELETE FROM|CREATE (TABLE|VIRTUAL TABLE|"
                 r"INDEX)|DROP TABLE|ALTER TABLE|PRAGMA \w+)\b", re.S)
#: each layer imports only from layers below it (and within itself); cycles are checked separately
LAYERS = (
    {"_version", "errors", "tasks", "config", "progress"},
    {"io", "data", "models"},
    {"postproc", "metrics", "outputs"},
    {"infer", "train"},
    {"api", "demo", "view", "cli", "__main__", ""},
)
TORCH_FREE = ("postproc", "metrics", "outputs", "io", "data")


def _name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str) -> dict[str, int]:
    """Modules of the package (and top-level foreign packages) that ``name`` imports -> first line."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            out.setdefault(t if t.startswith("cerberus_histo") else t.split(".")[0], node.lineno)
    return out


GRAPH = {m: {t: ln for t, ln in _imports(m).items() if t in MODULES and t != m} for m in MODULES}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    assert all(_layer(m) >= 0 for m in MODULES)


def test_no_import_cycle():
    """Depth-first search for a back edge; a cycle is reported as the chain of modules."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_layers_import_downwards():
    wrong = [f"{m} imports {t} ({MODULES[m].name}:{ln})" for m, targets in GRAPH.items()
             for t, ln in targets.items() if _layer(t) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_io_reads_and_outputs_write():
    """Readers (io) never reach the result writers, and the network knows nothing of inference."""
    bad = [(m, t) for m, targets in GRAPH.items() for t in targets
           if (m.startswith("cerberus_histo.io") and t.startswith("cerberus_histo.outputs"))
           or (m.startswith("cerberus_histo.models") and t.split(".")[1] in ("infer", "train", "api", "outputs"))]
    assert not bad


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_torch_free_layers(layer):
    uses = [f"{m}:{ln}" for m in MODULES if m.startswith(f"cerberus_histo.{layer}")
            for t, ln in _imports(m).items() if t in ("torch", "lightning", "pytorch_lightning")]
    assert not uses, f"{layer} imports torch: {uses}"


def test_sql_only_in_the_store():
    store = "cerberus_histo.outputs.store"
    offenders = []
    for m, path in MODULES.items():
        if m == store:
            continue
        if "sqlite3" in _imports(m):
            offenders.append(f"{m} imports sqlite3")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                offenders.append(f"{m}:{node.lineno} {node.value[:40]!r}")
    assert not offenders, "\n".join(offenders)
    assert "sqlite3" in _imports(store)


def test_the_checks_see_function_level_imports():
    """The walk must see an import inside a function (the old model -> inference cycle was one)."""
    assert "cerberus_histo.infer.tiles" in GRAPH["cerberus_histo.api"]
    assert "cerberus_histo.infer.wsi" in GRAPH["cerberus_histo.api"]
