"""design.md's layering, enforced on every import of every module of ``keisei_fn/``.

Every ``import`` and ``from ... import`` counts, wherever it is: at module level, inside a
function (lazy imports), under ``if TYPE_CHECKING:``, relative or absolute. ``from pkg import
name`` is an import of the submodule ``pkg.name`` when there is one, else of ``pkg``. Importing a
submodule also runs its parent packages' ``__init__``; that implicit import is not an edge
(every submodule would otherwise form a cycle with its package's re-exports).

Three rules:

1. A module imports only its own layer and the layers below it (``MAY_IMPORT``, transitively);
   ``errors`` is open to everyone.
2. Only modules inside ``keisei_fn/store/`` import ``keisei_fn.store._fs``.
3. No import cycle between keisei_fn modules, lazy imports included (each is reported as a
   shortest cycle through one of its modules).

The layers (design.md's diagram, with the modules it does not draw placed by what they are and
what they import today):

==============  ===================================  =============================================
layer           modules                              may import (directly; and all below those)
==============  ===================================  =============================================
entry           ``keisei_fn`` (the public API),      cli
                ``__main__``
cli             cli                                  demo, analysis, testing, info, diff,
                                                     average, compat, grow, serve,
                                                     play
serve           serve (export bundles, the           store, shogi
                behaviour gate, validation)
play            match, usi (games against engines)   player, elo
player          player (a network choosing moves)    store, search, shogi, serve
search          search (PUCT over an evaluator)      (nothing)
elo             elo (Elo maths, the gate)            (nothing)
diff            diff (what changed between states)   store
average         average, ema, ensemble (averaged     store, shogi
                and mixed models)
compat          compat (will a checkpoint load)      store
grow            grow (a state for a larger tower)    state, nets
demo            demo (``keisei-fn demo``)            publish, shogi
analysis        analysis (policy on positions)       shogi, display
testing         testing                              store
publish         publish                              store
store           store                                meta, capture, distributed, health,
                                                     quantize
health          health (the health gate's checks)    state, nets, shogi
meta            meta (CheckpointMeta, the sidecar)   codec, paths, version
codec           codec                                state
capture         capture, rng (bridges between live   state, nets, distributed
                torch objects and snapshots),
                staging (host copies of device
                tensors)
info            info (beside nets)                   nets, precision
state           state (TrainState, GameStats)        spec, display
display         display (tables, sizes, ages for     spec
                the CLI and notebook reprs)
nets            nets                                 spec
shogi           shogi, sfen                          spec
spec            spec, features (the registry)        errors
precision       precision                            errors
quantize        quantize (bundle weight encodings)   errors
distributed     distributed                          errors
paths           paths                                errors
version         _version                             (nothing)
errors          errors                               (nothing)
==============  ===================================  =============================================
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

PACKAGE = "keisei_fn"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Each top-level module or package of keisei_fn (the package itself: ``""``) → its layer.
LAYER_OF: Mapping[str, str] = {
    "": "entry",
    "__main__": "entry",
    "cli": "cli",
    "serve": "serve",
    "demo": "demo",
    "analysis": "analysis",
    "testing": "testing",
    "diff": "diff",
    "average": "average",
    "ema": "average",
    "ensemble": "average",
    "compat": "compat",
    "grow": "grow",
    "publish": "publish",
    "store": "store",
    "meta": "meta",
    "health": "health",
    "codec": "codec",
    "capture": "capture",
    "rng": "capture",
    "staging": "capture",
    "info": "info",
    "state": "state",
    "display": "display",
    "nets": "nets",
    "shogi": "shogi",
    "sfen": "shogi",
    "spec": "spec",
    "features": "spec",
    "precision": "precision",
    "quantize": "quantize",
    "distributed": "distributed",
    "paths": "paths",
    "_version": "version",
    "errors": "errors",
    "match": "play",
    "usi": "play",
    "player": "player",
    "search": "search",
    "elo": "elo",
}

#: Layer → the layers directly below it that it may import.
MAY_IMPORT: Mapping[str, frozenset[str]] = {
    "entry": frozenset({"cli"}),
    "cli": frozenset(
        {
            "demo",
            "analysis",
            "testing",
            "info",
            "diff",
            "average",
            "compat",
            "grow",
            "serve",
            "play",
        }
    ),
    "serve": frozenset({"store", "shogi"}),
    "diff": frozenset({"store"}),
    "average": frozenset({"store", "shogi"}),
    "compat": frozenset({"store"}),
    "grow": frozenset({"state", "nets"}),
    "demo": frozenset({"publish", "shogi"}),
    "analysis": frozenset({"shogi", "display"}),
    "testing": frozenset({"store"}),
    "publish": frozenset({"store"}),
    "store": frozenset({"meta", "capture", "distributed", "health", "quantize"}),
    "health": frozenset({"state", "nets", "shogi"}),
    "meta": frozenset({"codec", "paths", "version"}),
    "codec": frozenset({"state"}),
    "capture": frozenset({"state", "nets", "distributed"}),
    "info": frozenset({"nets", "precision"}),
    "state": frozenset({"spec", "display"}),
    "display": frozenset({"spec"}),
    "nets": frozenset({"spec"}),
    "shogi": frozenset({"spec"}),
    "spec": frozenset({"errors"}),
    "precision": frozenset({"errors"}),
    "quantize": frozenset({"errors"}),
    "distributed": frozenset({"errors"}),
    "paths": frozenset({"errors"}),
    "version": frozenset(),
    "errors": frozenset(),
    "play": frozenset({"player", "elo"}),
    "player": frozenset({"store", "search", "shogi", "serve"}),
    "search": frozenset(),
    "elo": frozenset(),
}

#: Open to every layer.
OPEN_TO_ALL = frozenset({"errors"})

PRIVATE_FS = f"{PACKAGE}.store._fs"
STORE_PREFIX = f"{PACKAGE}.store."

Graph = Mapping[str, Iterable[str]]


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package under its own name)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(module: str, source: str, *, is_package: bool, known: Iterable[str]) -> set[str]:
    """The keisei_fn modules that ``source`` (the text of ``module``) imports, anywhere in it.

    Args:
        module: its dotted name.
        source: its text.
        is_package: whether it is a package's ``__init__`` (relative imports start there).
        known: every module's dotted name (``from pkg import name`` names a submodule if known).

    Returns:
        The imported modules of the package, without ``module`` itself.
    """
    modules = set(known)
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in modules else origin)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")} - {module}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """module → the keisei_fn modules it imports, for every module of the package."""
    files = module_files()
    return {
        module: frozenset(
            imports_of(module, path.read_text(), is_package=path.name == "__init__.py", known=files)
        )
        for module, path in files.items()
    }


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (None: not in ``LAYER_OF``)."""
    top = module.split(".")[1] if "." in module else ""
    return LAYER_OF.get(top)


def below(layer: str) -> frozenset[str]:
    """Every layer ``layer`` may import: its own, those it names, and all below those."""
    seen = {layer}
    todo = [layer]
    while todo:
        for lower in MAY_IMPORT[todo.pop()]:
            if lower not in seen:
                seen.add(lower)
                todo.append(lower)
    return frozenset(seen | OPEN_TO_ALL)


def layering_violations(graph: Graph) -> list[str]:
    """Every import against the layering, as ``"a (layer) imports b (layer)"``."""
    problems = []
    for module, imported in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(imported):
            theirs = layer_of(target)
            if mine is None or theirs is None:
                problems.append(f"{module} imports {target}: give both a layer in LAYER_OF")
            elif theirs not in below(mine):
                problems.append(f"{module} ({mine}) imports {target} ({theirs})")
    return problems


def private_fs_violations(graph: Graph) -> list[str]:
    """Every import of ``keisei_fn.store._fs`` from outside ``keisei_fn/store/``."""
    return [
        f"{module} imports {PRIVATE_FS}: use the public functions of keisei_fn.store"
        for module, imported in sorted(graph.items())
        if PRIVATE_FS in imported and not module.startswith(STORE_PREFIX)
    ]


def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles (``[a, b, ..., a]``, from their smallest name): a shortest one through
    each module that is on any cycle."""
    edges = {m: sorted(set(targets)) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    found = {_shortest_cycle(member, group, edges) for group in groups for member in group}
    return [[*cycle, cycle[0]] for cycle in sorted(found)]


def _shortest_cycle(start: str, group: set[str], edges: Mapping[str, list[str]]) -> tuple[str, ...]:
    """A shortest cycle through ``start`` inside its group, rotated to its smallest name."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in edges[node]:
            if nxt == start:
                cycle = paths[node]
                first = cycle.index(min(cycle))
                return tuple(cycle[first:] + cycle[:first])
            if nxt in group and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


# --- the package -------------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    assert not [m for m in import_graph() if layer_of(m) is None]


def test_the_layers_form_a_hierarchy() -> None:
    assert set(LAYER_OF.values()) == set(MAY_IMPORT)
    for layer, lower in MAY_IMPORT.items():
        assert all(layer not in below(other) for other in lower), layer  # no layer cycle


def test_imports_follow_the_layering() -> None:
    assert layering_violations(import_graph()) == []


def test_only_the_store_imports_its_private_file_primitives() -> None:
    assert private_fs_violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


# --- the checks themselves ---------------------------------------------------------------------


def test_imports_are_found_wherever_they_are() -> None:
    known = {
        "keisei_fn",
        "keisei_fn.errors",
        "keisei_fn.store",
        "keisei_fn.store._fs",
        "keisei_fn.store.listing",
        "keisei_fn.store.names",
        "keisei_fn.codec",
    }
    source = """
from typing import TYPE_CHECKING
import os
from . import _fs
from .names import RESUME_PREFIX
from .. import errors
if TYPE_CHECKING:
    from keisei_fn.codec import dumps

def lazy():
    import keisei_fn.store.listing as listing
    from keisei_fn import __version__
"""
    found = imports_of("keisei_fn.store.x", source, is_package=False, known=known)
    assert found == {
        "keisei_fn.store._fs",
        "keisei_fn.store.names",
        "keisei_fn.errors",
        "keisei_fn.codec",
        "keisei_fn.store.listing",
        "keisei_fn",
    }
    in_package = imports_of("keisei_fn.store", "from . import names", is_package=True, known=known)
    assert in_package == {"keisei_fn.store.names"}


def test_the_checks_find_violations() -> None:
    fake = {
        "keisei_fn.spec": {"keisei_fn.store.listing"},  # up the layers
        "keisei_fn.meta": {"keisei_fn"},  # the package root is the top
        "keisei_fn.cli.commands": {"keisei_fn.store._fs"},  # allowed by layer, still private
        "keisei_fn.store.a": {"keisei_fn.store.b", "keisei_fn.store._fs"},
        "keisei_fn.store.b": {"keisei_fn.store.c"},
        "keisei_fn.store.c": {"keisei_fn.store.a", "keisei_fn.errors"},
        "keisei_fn.newthing": {"keisei_fn.errors"},
    }
    assert layering_violations(fake) == [
        "keisei_fn.meta (meta) imports keisei_fn (entry)",
        "keisei_fn.newthing imports keisei_fn.errors: give both a layer in LAYER_OF",
        "keisei_fn.spec (spec) imports keisei_fn.store.listing (store)",
    ]
    assert private_fs_violations(fake) == [
        "keisei_fn.cli.commands imports keisei_fn.store._fs: use the public functions of "
        "keisei_fn.store"
    ]
    assert cycles(fake) == [
        ["keisei_fn.store.a", "keisei_fn.store.b", "keisei_fn.store.c", "keisei_fn.store.a"]
    ]
    lazy = {  # one group, two cycles (a lazy import inside a function is an edge too)
        "keisei_fn.store.checkpoints": {"keisei_fn.store.sharded", "keisei_fn.meta"},
        "keisei_fn.store.sharded": {"keisei_fn.store.checkpoints"},
        "keisei_fn.meta": {"keisei_fn"},
        "keisei_fn": {"keisei_fn.store.checkpoints"},
    }
    assert cycles(lazy) == [
        ["keisei_fn", "keisei_fn.store.checkpoints", "keisei_fn.meta", "keisei_fn"],
        ["keisei_fn.store.checkpoints", "keisei_fn.store.sharded", "keisei_fn.store.checkpoints"],
    ]
    assert cycles({"keisei_fn.a": {"keisei_fn.b"}, "keisei_fn.b": set()}) == []
