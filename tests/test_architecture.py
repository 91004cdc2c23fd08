"""The package's structure, checked from its source (ast; nothing is imported but the mode registry):

* no import cycle between modules of ``lowrank_attn`` — module-level and function-level imports alike (an
  ``if TYPE_CHECKING:`` block, which never runs, is left out: annotations may name a type upstream);
* no module imports a ``_private`` name of another module;
* ``runtime/`` (copied verbatim into every checkpoint and imported by transformers' remote-code loader) imports
  nothing of the package outside ``runtime/``, and its siblings only as ``from .module import name`` — the form
  the loader follows;
* no module outside ``runtime/modes.py`` compares anything with a mode's name: what the pipeline needs of a mode
  is a property of its object (``runtime.modes.MODES``).

See ARCHITECTURE.md for the rooms and what each may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lowrank_attn"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run (all depths; not under ``if TYPE_CHECKING:``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (before its imported names)."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _owner(name: str) -> str | None:
    """The package module ``name`` lives in (itself, or the nearest enclosing package module), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _base(mod, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for t in targets:
                owner = _owner(t)
                if owner and owner != mod:
                    edges[mod].add(owner)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles (function-level imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or _owner(_base(mod, node)) is None:
                continue
            base = _base(mod, node)
            for a in node.names:
                private = a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))
                if private or any(p.startswith("_") and not p.startswith("__") for p in base.split(".")):
                    bad.append(f"{mod}: from {base} import {a.name}")
    assert not bad, "private names imported from another module: " + "; ".join(bad)


def test_runtime_imports_only_its_siblings_in_the_form_the_loader_follows():
    bad = []
    for mod, path in MODULES.items():
        if not mod.startswith("lowrank_attn.runtime."):
            continue
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
                if any(n == "lowrank_attn" or n.startswith("lowrank_attn.") for n in names):
                    bad.append(f"{mod}: import {', '.join(names)}")
                continue
            base = _base(mod, node)
            if not base.startswith("lowrank_attn"):
                continue  # torch, transformers, …
            if base != "lowrank_attn.runtime" and not base.startswith("lowrank_attn.runtime."):
                bad.append(f"{mod}: imports {base} (outside runtime/)")
            elif node.level != 1 or not node.module:
                bad.append(f"{mod}: `from {'.' * node.level}{node.module or ''} import …` (the loader follows "
                           "only `from .module import name`)")
    assert not bad, "; ".join(bad)


def test_no_mode_name_comparisons_outside_the_mode_objects():
    from lowrank_attn.runtime.modes import MODES

    names = set(MODES)
    allowed = PKG / "runtime" / "modes.py"

    def literals(node) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literals(e) for e in node.elts)) if node.elts else set()
        return set()

    bad = []
    for path in MODULES.values():
        if path == allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                hit = set().union(*(literals(n) for n in [node.left, *node.comparators])) & names
            elif isinstance(node, ast.match_case):
                hit = {n.value.value for n in ast.walk(node.pattern)
                       if isinstance(n, ast.MatchValue) and isinstance(n.value, ast.Constant)} & names
            else:
                continue
            if hit:
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno if hasattr(node, 'lineno') else '?'} "
                           f"compares with {sorted(hit)}")
    assert not bad, "mode names compared outside runtime/modes.py (give the mode object a property): " + "; ".join(bad)


# ----------------------------------------------------------------------------- eval/: thin scripts over the package

EVAL = PKG.parent / "eval"
EVAL_SCRIPTS = sorted(EVAL.rglob("*.py"))


def test_eval_scripts_edit_no_sys_path():
    """eval/ scripts import the installed package (and its harness), never a neighbour through ``sys.path``."""
    bad = [str(p.relative_to(PKG.parent)) for p in EVAL_SCRIPTS if "sys.path" in p.read_text(encoding="utf-8")]
    assert EVAL_SCRIPTS and not bad, "sys.path edited in: " + ", ".join(bad)


def test_eval_scripts_import_only_public_names_of_the_package():
    """eval/ scripts use the package's public names only: no ``_private`` name or module of ``lowrank_attn``
    (``from lowrank_attn.x import _y``, ``import lowrank_attn._x``), and no other eval/ script as a module."""
    local = {p.stem for p in EVAL_SCRIPTS}
    bad = []
    for path in EVAL_SCRIPTS:
        where = path.relative_to(PKG.parent)
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods, names = [a.name for a in node.names], []
            else:
                mods, names = [node.module or ""], [a.name for a in node.names]
            for mod in mods:
                if mod.split(".")[0] in local or node.__class__ is ast.ImportFrom and node.level:
                    bad.append(f"{where}: imports the eval script {mod or '.'}")
                elif mod.split(".")[0] == "lowrank_attn" and any(
                        p.startswith("_") for p in mod.split(".") + names if not p.startswith("__")):
                    bad.append(f"{where}: from {mod} import {', '.join(names)}")
    assert not bad, "; ".join(bad)


MAX_SCRIPT_LINES = 150
# eval/ scripts over MAX_SCRIPT_LINES, each with the reason. Nothing new goes here: a script's run loop, rows and
# report go into lowrank_attn/harness/ (as ruler_run/ruler_report, long_context/long_report did); remove an entry
# when its script is thinned.
SCRIPT_SIZE_EXEMPT = {
    # runs in its own venv (kvpress pins an older transformers than the package needs): the kvpress pipeline it
    # drives cannot be imported by the package; what it shares with eval/ruler.py is already harness.ruler
    "eval/kvpress/run_ruler.py": "own venv",
    # not thinned yet: each still holds its measuring loop and its table/plot writer (the same move as
    # eval/ruler.py's; their committed tables must regenerate byte for byte afterwards)
    "eval/bench_analyze.py": "not thinned yet",
    "eval/bench_calibrate.py": "not thinned yet",
    "eval/bench_decode.py": "not thinned yet",
    "eval/bench_memory.py": "not thinned yet",
    "eval/kv_total.py": "not thinned yet",
    "eval/precision.py": "not thinned yet",
    "eval/targets.py": "not thinned yet",
}


def _script_lines(rel: str) -> int:
    return len((PKG.parent / rel).read_text(encoding="utf-8").splitlines())


def test_eval_scripts_are_thin():
    """An eval/ script is argument parsing and a call into the package (``lowrank_attn.harness`` and the measures):
    at most 150 lines, docstring included; the scripts the README's RULER and long-context numbers come from, under
    100."""
    scripts = {p.relative_to(PKG.parent).as_posix() for p in EVAL_SCRIPTS}
    bad = [f"{rel}: {n} lines" for rel in sorted(scripts - set(SCRIPT_SIZE_EXEMPT))
           if (n := _script_lines(rel)) > MAX_SCRIPT_LINES]
    assert not bad, f"eval/ scripts over {MAX_SCRIPT_LINES} lines (move the logic into lowrank_attn/harness/): " + "; ".join(bad)
    for rel in ("eval/ruler.py", "eval/long_context.py"):
        assert _script_lines(rel) < 100, f"{rel}: {_script_lines(rel)} lines; it is a main() over lowrank_attn.harness"


def test_the_script_size_exemptions_are_still_needed():
    for rel in SCRIPT_SIZE_EXEMPT:
        assert (PKG.parent / rel).is_file(), f"{rel} is gone: drop it from SCRIPT_SIZE_EXEMPT"
        assert _script_lines(rel) > MAX_SCRIPT_LINES, f"{rel} is within {MAX_SCRIPT_LINES} lines: drop it from SCRIPT_SIZE_EXEMPT"


# ----------------------------------------------------------------------------- sizes

MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# Over the limits while another change splits them; remove an entry when its module is split. Nothing new goes here.
SIZE_EXEMPT: set[str] = set()


def test_modules_and_functions_stay_small():
    """No module of the package over 400 lines and no function (def line to its end, nested ones included in
    their parent) over 60: split by meaning (see ARCHITECTURE.md) instead."""
    bad = []
    for path in MODULES.values():
        rel = path.relative_to(PKG.parent).as_posix()
        if rel in SIZE_EXEMPT:
            continue
        text = path.read_text(encoding="utf-8")
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            bad.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    bad.append(f"{rel}:{node.lineno} {node.name}() {n} lines")
    assert not bad, f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function: " + "; ".join(bad)


def test_the_size_exemptions_are_still_needed():
    for rel in SIZE_EXEMPT:
        path = PKG.parent / rel
        assert path.is_file(), f"{rel} is gone: drop it from SIZE_EXEMPT"
        text = path.read_text(encoding="utf-8")
        long_fn = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= MAX_FUNCTION_LINES
                      for n in ast.walk(ast.parse(text)))
        assert len(text.splitlines()) > MAX_MODULE_LINES or long_fn, f"{rel} is within the limits: drop it from SIZE_EXEMPT"
