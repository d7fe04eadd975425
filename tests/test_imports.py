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
