"""The package's folders keep a one-way data flow: no module imports one that imports it back (a cycle hidden in a
function body included)."""
import ast
from pathlib import Path

import unf

ROOT = Path(unf.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """The unf modules ``path`` imports anywhere in its body (``from . import x`` counts as ``pkg.x`` when x is one)."""
    pkg = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in modules else base)
    return {m for m in out if m in modules}


def test_the_align_package_has_no_import_cycle():
    files = sorted((ROOT / "align").glob("*.py"))
    modules = {_module(f) for f in files}
    graph = {_module(f): _imports(f, modules) - {_module(f), "unf.align"} for f in files}
    assert graph["unf.align.matching"] >= {"unf.align.heads", "unf.align.assignment"}

    def reach(start, seen):
        for nxt in graph[start]:
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = [m for m in graph if m in reach(m, set())]
    assert not cycles, {m: graph[m] for m in cycles}


def test_import_unf_stays_light():
    import subprocess
    import sys

    code = ("import sys, unf, unf.nn, unf.zoo, unf.align; "
            "print(sorted(m for m in ('torch_geometric', 'matplotlib', 'unf.nn.graph') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_library_code_never_imports_the_cli():
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module(f) for f in files}
    assert {"unf.cli", "unf.cli.common", "unf.flow.zoo"} <= modules
    cli = ROOT / "cli"
    offenders = {}
    for f in files:
        if cli in f.parents:
            continue
        found = {m for m in _imports(f, modules) if m == "unf.cli" or m.startswith("unf.cli.")}
        for node in ast.walk(ast.parse(f.read_text())):  # importlib.import_module("unf.cli..."), __import__(...)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in \
                    ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).startswith("unf.cli"):
                found.add(f"{node.args[0].value} (dynamic, line {node.lineno})")
        if found:
            offenders[str(f.relative_to(ROOT.parent))] = sorted(found)
    assert not offenders, offenders

