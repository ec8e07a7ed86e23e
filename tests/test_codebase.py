"""Guard rails on the source tree itself (issue 16, "Must show"): no import cycles in diffjax (function-level
imports included), no public name defined twice, experiments/ never patches the library, and no measured
numbers in the package's docstrings. Pure static analysis (ast, text): nothing is imported or compiled."""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffjax"


# ----------------------------------------------------------------------------------------------------------
# The package's modules
# ----------------------------------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (a package is its __init__)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}
# module -> (its file relative to the repository, its syntax tree): what the import-graph functions read
SOURCES = {name: (str(path.relative_to(ROOT)), TREES[name]) for name, path in MODULES.items()}


def _is_package(module: str, sources) -> bool:
    return module in sources and sources[module][0].endswith("__init__.py")


def _ancestors(module: str) -> list[str]:
    """Enclosing packages, outermost first: a.b.c -> [a, a.b]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _location(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{node.lineno}"


# ----------------------------------------------------------------------------------------------------------
# Import cycles
# ----------------------------------------------------------------------------------------------------------


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of nodes under `if TYPE_CHECKING:` (never executed, so never part of a cycle)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _from_base(module: str, node: ast.ImportFrom, sources) -> str:
    """The absolute module named by `from <base> import ...` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if _is_package(module, sources) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imported_modules(module: str, tree: ast.Module, sources):
    """(target module, import node) for every import in `module`, at any depth (function-level included).

    `import a.b.c` and `from a.b import c` where a.b.c is a module target a.b.c; `from a.b import name` where
    `name` is not a module targets a.b (its __init__ must run far enough to define `name`).
    `importlib.import_module("a.b")` with a literal name counts as well.
    """
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node, sources)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in sources else base), node
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node


def import_graph(sources=SOURCES) -> dict[str, dict[str, str]]:
    """module -> {module whose execution it can trigger: file:line of the import}.

    Executing `import p.q.m` runs p/__init__, then p/q/__init__, then m, each unless already started. So an
    import of target T in module A gives the edge A -> T, and A -> every package enclosing T that does not
    also enclose A: A's own enclosing packages have always started before A runs (Python imports a
    module's parents first), so importing their submodules never re-runs them. T itself always counts,
    even when it encloses A: `from diffjax.samplers import make_grid` inside diffjax/samplers/optimize.py
    needs samplers/__init__ to have defined make_grid. That is why a package __init__ that imports its
    submodules does not form a cycle with a submodule importing a sibling (`from diffjax.processes import
    VP` inside diffjax/samplers/x.py does not re-run diffjax/__init__), while `from diffjax import VP` there
    does: it needs names that diffjax/__init__ defines only after its own import of diffjax.samplers.
    """
    graph: dict[str, dict[str, str]] = {name: {} for name in sources}
    for module, (path, tree) in sources.items():
        enclosing = set(_ancestors(module))
        for target, node in _imported_modules(module, tree, sources):
            if target not in sources:
                continue  # another library
            implied = [p for p in _ancestors(target) if p not in enclosing]
            for triggered in [*implied, target]:
                if triggered != module:
                    graph[module].setdefault(triggered, f"{path}:{node.lineno}")
    return graph


def _strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _one_cycle(graph: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start, members = component[0], set(component)
    parent = {start: None}
    queue = collections.deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def import_cycles(sources=SOURCES) -> list[str]:
    """One readable cycle per strongly connected component: 'a -> b (file:line) -> a (file:line)'."""
    graph = import_graph(sources)
    described = []
    for component in _strongly_connected(graph):
        cycle = _one_cycle(graph, component)
        steps = [f"{b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        described.append(" -> ".join([cycle[0], *steps]))
    return described


def _fake_package(files: dict[str, str]):
    """SOURCES for a made-up package: {"p/__init__.py": source, "p/a.py": source, ...}."""
    sources = {}
    for path, text in files.items():
        parts = path.removesuffix(".py").split("/")
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = (path, ast.parse(text))
    return sources


def test_the_import_graph_rule_on_made_up_packages():
    """What counts as a cycle (see `import_graph`), on small packages whose answer is known."""
    # a package re-exporting its submodules, which import their siblings: no cycle
    reexport = {
        "p/__init__.py": "from p import a, b\nfrom p.b import g\n",
        "p/a.py": "from p.b import g\nfrom . import b\n",
        "p/b.py": "import math\ndef g():\n    from p.a import f\n",
    }
    assert import_cycles(_fake_package(reexport)) == ["p.a -> p.b (p/a.py:1) -> p.a (p/b.py:3)"]
    del reexport["p/b.py"]
    reexport["p/b.py"] = "def g():\n    return 1\n"
    assert import_cycles(_fake_package(reexport)) == []
    # a submodule taking a name from its own package's __init__, which imports it: a cycle
    from_parent = {"p/__init__.py": "from p.a import f\nX = 1\n", "p/a.py": "def f():\n    from p import X\n"}
    assert import_cycles(_fake_package(from_parent)) == ["p -> p.a (p/__init__.py:1) -> p (p/a.py:2)"]
    # importing q.m runs q/__init__ first: a cycle through a package __init__ that is not an ancestor
    through_init = {"p/__init__.py": "", "p/a.py": "import p.q.m\n", "p/q/__init__.py": "from p.a import f\n"}
    through_init["p/q/m.py"] = ""
    assert import_cycles(_fake_package(through_init)) == ["p.a -> p.q (p/a.py:1) -> p.a (p/q/__init__.py:1)"]
    # relative imports and `from package import module` resolve to the module
    tree = ast.parse("def f():\n    from . import b\n    from .c import d\n")
    sources = _fake_package({"p/__init__.py": "", "p/x/__init__.py": "", "p/x/y.py": ""})
    bases = sorted(_from_base("p.x.y", n, sources) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert bases == ["p.x", "p.x.c"]


def test_the_import_graph_reads_the_package():
    graph = import_graph()
    assert "diffjax.processes" in graph["diffjax.denoisers"]
    assert "diffjax.samplers" in graph["diffjax"]


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles (module -> module it imports (where)):\n  " + "\n  ".join(cycles)


# ----------------------------------------------------------------------------------------------------------
# One name, one definition
# ----------------------------------------------------------------------------------------------------------


def _top_level_definitions(tree: ast.Module):
    """Functions and classes defined at module level (also inside top-level if/try blocks)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            pending.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)


def duplicate_public_definitions() -> dict[str, list[str]]:
    """Public name (no leading underscore) -> where it is defined, for names defined in two or more modules.
    Re-exports (imports) are not definitions and do not count."""
    where = collections.defaultdict(list)
    for module, tree in TREES.items():
        for node in _top_level_definitions(tree):
            if not node.name.startswith("_"):
                where[node.name].append(_location(module, node))
    return {name: places for name, places in sorted(where.items()) if len({p.split(":")[0] for p in places}) > 1}


def test_no_two_public_definitions_share_a_name():
    duplicates = duplicate_public_definitions()
    lines = [f"{name}: {', '.join(places)}" for name, places in duplicates.items()]
    assert not duplicates, "public names defined in more than one module:\n  " + "\n  ".join(lines)


# ----------------------------------------------------------------------------------------------------------
# experiments/ uses the library, never patches it
# ----------------------------------------------------------------------------------------------------------

PATCHING = re.compile(r"\bmock\.patch\b|\bsys\.path\.(insert|append)\b|\bunittest\.mock\b|^\s*import mock\b", re.M)


def patching_in_experiments() -> list[str]:
    """file:line: text, for every mock.patch / unittest.mock import / sys.path edit in experiments/*.py."""
    found = []
    for path in sorted((ROOT / "experiments").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if PATCHING.search(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    return found


def test_experiments_do_not_patch_the_library():
    found = patching_in_experiments()
    assert not found, "experiments/ patches the library or sys.path:\n  " + "\n  ".join(found)


# ----------------------------------------------------------------------------------------------------------
# No measured numbers in docstrings (they go to experiments/results/)
# ----------------------------------------------------------------------------------------------------------

# A measured number is a decimal (61.2, 0.0086) or a percentage (4.8 %) in prose: not inside inline code
# (`...`, ``...``) and not right after `=`, `*`, `/` or `^` (a formula or an option value). It counts as a
# measurement when the same sentence names an evaluation metric, a cost counted in evaluations (NFE), or
# a results file; a decimal alone is usually a parameter or a default (rho 7.0, dropout 0.13).
INLINE_CODE = re.compile(r"``.*?``|`[^`]*`", re.S)
MEASURED_NUMBER = re.compile(r"(?<![\w.=*/^])(?<![=*/^]\s)\d+\.\d+(?![\w.])|(?<![\w.=*/^])(?<![=*/^]\s)\d+(\.\d+)?\s?%")
MEASUREMENT_CONTEXT = re.compile(
    r"\b(FID|KID|NFE|NLL|bits/dim|bpd|Inception Score|speed-?up|wall[- ]clock)\b|experiments/results"
)
SENTENCE_END = re.compile(r"(?<=[.;])\s+(?=[A-Z(])|\n\s*\n")


def _docstrings(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node, doc


def measured_numbers_in_docstrings() -> list[str]:
    """file:line: sentence, for each docstring sentence holding a measured number (see MEASURED_NUMBER)."""
    found = []
    for module, tree in TREES.items():
        for node, doc in _docstrings(tree):
            line = node.body[0].lineno
            for sentence in SENTENCE_END.split(INLINE_CODE.sub("`code`", doc)):
                if sentence and MEASURED_NUMBER.search(sentence) and MEASUREMENT_CONTEXT.search(sentence):
                    found.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {' '.join(sentence.split())[:160]}")
    return found


def test_the_measured_number_heuristic():
    def flagged(text):
        text = INLINE_CODE.sub("`code`", text)
        return bool(MEASURED_NUMBER.search(text) and MEASUREMENT_CONTEXT.search(text))

    assert flagged("UniPC-3 scores FID 76.1 at 10 NFE")
    assert flagged("it reaches (0.116, 4.8 %) at 5 NFE")
    assert flagged("the std error is 0.6 % (experiments/results/sampler_accuracy.md)")
    assert not flagged("1 NFE per step; order 2")
    assert not flagged("LogNormal(mean=-1.2, std=1.2) as in EDM")
    assert not flagged("see experiments/results/sampler_accuracy.md for the table")
    assert not flagged("then ``x / 127.5 - 1``, as the reference FID code does")
    assert not flagged("scales to x / 127.5 - 1 (the FID code), rho=7.0 at 10 NFE")


def test_no_measured_numbers_in_docstrings():
    found = measured_numbers_in_docstrings()
    assert not found, "docstrings with measured numbers (move them to experiments/results/):\n  " + "\n  ".join(found)
