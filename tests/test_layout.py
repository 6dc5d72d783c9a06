"""The package's layout holds as docs/architecture.md states it. The test reads that page's table of layers (each
folder or module, its layer, what it must not import) and checks the code against it: every module has a row, the
layers import downwards only, no row imports what it must not, there is no import cycle, SQL is only in the store,
and images are encoded only in io/files.py. Every import counts, also those inside functions."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "cerberus_histo"
ARCHITECTURE = REPO / "docs" / "architecture.md"
SQL = re.compile(r"\b(SELECT\b.*\bFROM|INSERT INTO|REPLACE INTO|UPDATE \w+ SET|DELETE FROM|CREATE (TABLE|VIRTUAL TABLE|"
                 r"INDEX)|DROP TABLE|ALTER TABLE|PRAGMA \w+)\b", re.S)
#: a name of the "must not import" column that stands for several top-level packages
FOREIGN = {"torch": {"torch", "lightning", "pytorch_lightning"}}
IMAGE_ENCODER = "cerberus_histo.io.files"


def _cell_name(name: str) -> str:
    """A table cell's name (``io/``, ``cli.py``, ``__init__.py``, ``torch``) as the top-level name it means: a
    folder or module of the package ("" for the package's own ``__init__``), or a foreign package."""
    name = name.rstrip("/")
    name = name[:-3] if name.endswith(".py") else name
    return "" if name == "__init__" else name


def read_layers(text: str) -> tuple[dict[str, int], dict[str, set[str]]]:
    """From the page's table: top-level name -> layer, and top-level name -> the names it must not import."""
    layer, banned = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([^`]+)`", cells[1]):
            layer[_cell_name(name)] = int(cells[0])
            banned[_cell_name(name)] = {_cell_name(n) for n in re.findall(r"`([^`]+)`", cells[3])}
    return layer, banned


LAYER, BANNED = read_layers(ARCHITECTURE.read_text())


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


def _top(module: str) -> str:
    """The row of a module of the package: its top-level folder or module ("" for the package's ``__init__``)."""
    return module.split(".")[1] if "." in module else ""


def test_the_page_has_a_row_for_every_module_and_folder():
    tops = {_top(m) for m in MODULES}
    assert len(LAYER) >= 15, "docs/architecture.md's table of layers was not found"
    assert not tops - set(LAYER), f"not in docs/architecture.md's table: {sorted(tops - set(LAYER))}"
    assert not set(LAYER) - tops, f"in docs/architecture.md's table, not in the package: {sorted(set(LAYER) - tops)}"
    unknown = {n for b in BANNED.values() for n in b} - set(LAYER) - set(FOREIGN)
    assert not unknown, f"'must not import' names that are neither a row nor a known package: {sorted(unknown)}"


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
    wrong = [f"{m} (layer {LAYER[_top(m)]}) imports {t} (layer {LAYER[_top(t)]}; {MODULES[m].name}:{ln})"
             for m, targets in GRAPH.items() for t, ln in targets.items() if LAYER[_top(t)] > LAYER[_top(m)]]
    assert not wrong, "\n".join(wrong)


def _banned_imports(module: str, banned: set[str]) -> list[str]:
    wrong = []
    for t, ln in _imports(module).items():
        if t.startswith("cerberus_histo"):
            hit = t in MODULES and t != module and _top(t) in banned and _top(t) != _top(module)
        else:
            hit = any(t in FOREIGN.get(b, {b}) for b in banned)
        if hit:
            wrong.append(f"{module} imports {t} ({MODULES[module].name}:{ln})")
    return wrong


def test_no_row_imports_what_it_must_not():
    wrong = [w for m in MODULES for w in _banned_imports(m, BANNED[_top(m)])]
    assert not wrong, "\n".join(wrong)


def test_the_ban_check_can_fail():
    """Not a check that cannot fail: models/ imports torch and io/, so banning them there is seen."""
    assert _banned_imports("cerberus_histo.models.net", {"torch"})
    assert _banned_imports("cerberus_histo.models.checkpoint", {"io"})
    assert "torch" in BANNED["io"] and "torch" not in BANNED["models"] and LAYER["outputs"] == 2


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


def test_images_are_encoded_in_one_module():
    """PNG (every image format) is encoded only in io/files.py: no other module calls OpenCV's ``imencode`` or
    ``imwrite``, or saves a PIL image as PNG (the viewer's JPEG image tiles are PIL's)."""
    offenders = []
    for m, path in MODULES.items():
        if m == IMAGE_ENCODER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("imencode", "imwrite"):
                offenders.append(f"{m}:{node.lineno} {node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "save" and any(
                    isinstance(a, ast.Constant) and str(a.value).lower() == "png" for a in [*node.args,
                                                                                             *(k.value for k in node.keywords)]):
                offenders.append(f"{m}:{node.lineno} save(..., 'png')")
    assert not offenders, "\n".join(offenders)
    assert "imencode" in MODULES[IMAGE_ENCODER].read_text()


def test_the_checks_see_function_level_imports():
    """The walk must see an import inside a function (the old model -> inference cycle was one)."""
    assert "cerberus_histo.infer.tiles" in GRAPH["cerberus_histo.api"]
    assert "cerberus_histo.infer.wsi" in GRAPH["cerberus_histo.api"]
