"""The package's shape (docs/architecture.md): layers import only downwards, no import cycles, small files, a
one-page fit loop, and every loss term known to the config."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "polyalign"
LAYERS = [  # bottom → top; a module may import its own layer or any layer below
    ("polyalign.errors",),
    ("polyalign.config",),
    ("polyalign.distributed", "polyalign.tokenizer"),
    ("polyalign.data",),
    ("polyalign.models",),
    ("polyalign.losses",),
    ("polyalign.train",),
    ("polyalign.eval",),
    ("polyalign.connect",),
    ("polyalign.app",),
    ("polyalign.serve",),
    ("polyalign.cli", "polyalign.__main__", "polyalign"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def imports_of(path: Path, module: str) -> set[str]:
    """polyalign modules imported by a file, anywhere in it (function-level imports count too)."""
    found, package = set(), module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("polyalign")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.startswith("polyalign"):
                for a in node.names:  # `from polyalign.x import y`: y is a submodule or a name of x
                    is_module = (SRC / (base.replace(".", "/") + f"/{a.name}.py")).exists()
                    found.add(f"{base}.{a.name}" if is_module else base)
    return found


GRAPH = {module_name(p): imports_of(p, module_name(p)) for p in sorted(PKG.rglob("*.py"))}


def test_imports_only_point_down():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in GRAPH.items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    # a package's __init__ importing its own submodules is how it re-exports names: not an edge of a cycle
    edges = {m: {d for d in deps if d in GRAPH and d != m and not d.startswith(m + ".")} for m, deps in GRAPH.items()}
    assert find_cycles(edges) == []


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [m])
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a -> b -> c -> a"]


def test_no_source_file_over_300_lines():
    long = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_fit_loop_is_one_page():
    tree = ast.parse((PKG / "train" / "fit.py").read_text())
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 80


def test_config_knows_every_loss_term():
    from polyalign.config import LOSS_TERMS
    from polyalign.losses.objective import TERMS

    assert tuple(TERMS) == LOSS_TERMS


@pytest.mark.parametrize("module", ["polyalign.config", "polyalign.losses.objective", "polyalign.models.build"])
def test_lower_layers_import_nothing_above(module):
    """Loading a config (or a loss, or a model) pulls in no trainer, app or CLI code."""
    import subprocess
    import sys

    code = (f"import sys, {module}; bad = [m for m in sys.modules if m.startswith(('polyalign.train', "
            f"'polyalign.app', 'polyalign.cli', 'polyalign.connect', 'polyalign.eval'))]; print(bad); "
            f"sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
