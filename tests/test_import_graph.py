"""hetmem's import graph: no import circle, and no import against the layering.

The graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` statement of a module counts, at module level, inside functions and under
`if TYPE_CHECKING:` alike, relative imports resolved against the module's package. `from P
import name` is an edge to the submodule P.name when there is one, else to P itself (its
`__init__`). The implicit import of a parent package that Python performs for `import a.b.c`
is not an edge: otherwise every module would import the root package's `__init__`.

The layering, bottom up (DESIGN.md's layout; a layer imports only itself and the layers named
in `MAY_IMPORT`):

- base: errors, argument checks, warnings, torch device naming, the profile and its timeline,
  the selection types, text and corpus helpers. Imports nothing of hetmem above it.
- kernels/: one spec per FPGA kernel (formats, golden model, cycle model, register map). The
  contract between methods and targets; numpy, no torch.
- fpga/: the FPGA device and its targets (emu, cosim, hls, xrt, pynq, cards). Reads kernels/;
  imports no method, no torch ("Methods do not import FPGA targets; targets do not import
  methods; both meet in kernels/ and pipeline.py").
- tensors: the float attention primitives (attention.py), their native one-row decode step
  (native/: C++ over ATen, built on first use), the step plan, synthetic data.
- costs: the system model's vocabulary (system/shape.py, system/accounting.py) in which each
  method states its own bytes and FLOPs.
- tasks: the retrieval tasks (text only).
- bundled/: the bundled LM (loading it, its training, its model card). Reads tasks.
- methods/: one module per method, its four steps in float torch (the reference). Never the
  FPGA targets, the pipeline or the models.
- placement: which device runs each step (placement.py).
- system/: the system model (devices, costs, schedules, energy, the planner behind
  placement="auto").
- pipeline: the four steps under a placement (pipeline.py, offload.py).
- selector weights: the trained selectors' weights file (selectors/weights.py), which the
  adapter reads to give `wrap(model, method="dsa")` the weights beside the model.
- models/: the Hugging Face adapter.
- selectors/: training the learned selectors on a frozen model (`hetmem calibrate`); it
  captures activations through the adapter's attention switching.
- apps: the CLI, `hetmem run`, the demo, the root package, and the hls4ml converter of the
  trained selectors (fpga/hls4ml_gate/: a build tool over selectors/, bundled/ and fpga/,
  which nothing below it imports).
"""

from __future__ import annotations

import ast
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = Path(__file__).resolve().parents[1] / "host"
PACKAGE = "hetmem"

#: Layer -> the modules (a name and everything under it) that make it. A module belongs to the
#: layer of its longest listed prefix; the root package name matches only itself.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": (
        "hetmem.checks",
        "hetmem.corpus",
        "hetmem.device",
        "hetmem.errors",
        "hetmem.profile",
        "hetmem.selection",
        "hetmem.text",
        "hetmem.timeline",
        "hetmem.warn",
    ),
    "kernels": ("hetmem.kernels",),
    "fpga": ("hetmem.fpga",),
    "tensors": ("hetmem.attention", "hetmem.native", "hetmem.plan", "hetmem.synthetic"),
    "costs": ("hetmem.system.accounting", "hetmem.system.shape"),
    "tasks": ("hetmem.tasks",),
    "bundled": ("hetmem.bundled",),
    "methods": ("hetmem.methods",),
    "placement": ("hetmem.placement",),
    "system": ("hetmem.system",),
    "pipeline": ("hetmem.offload", "hetmem.pipeline"),
    "selector weights": ("hetmem.selectors.weights",),
    "models": ("hetmem.models",),
    "selectors": ("hetmem.selectors",),
    "apps": ("hetmem", "hetmem.cli", "hetmem.demo", "hetmem.fpga.hls4ml_gate", "hetmem.run"),
}

#: Layer -> the other layers it may import.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "kernels": frozenset({"base"}),
    "fpga": frozenset({"base", "kernels"}),
    "tensors": frozenset({"base"}),
    "costs": frozenset({"base"}),
    "tasks": frozenset({"base"}),
    "bundled": frozenset({"base", "tasks"}),
    "methods": frozenset({"base", "kernels", "tensors", "costs"}),
    "placement": frozenset({"base", "methods"}),
    "system": frozenset({"base", "kernels", "fpga", "tensors", "costs", "methods", "placement"}),
    "pipeline": frozenset(
        {"base", "kernels", "fpga", "tensors", "costs", "methods", "placement", "system"}
    ),
    "selector weights": frozenset({"base", "kernels", "tensors", "costs", "methods"}),
    "models": frozenset(
        {"base", "kernels", "fpga", "tensors", "costs", "tasks", "methods", "placement"}
        | {"system", "pipeline", "selector weights"}
    ),
    "selectors": frozenset(
        {"base", "kernels", "tensors", "costs", "tasks", "methods", "selector weights"} | {"models"}
    ),
    "apps": frozenset(LAYERS) - {"apps"},
}

#: Layer -> third-party top-level packages it must not import.
NO_EXTERNAL: dict[str, frozenset[str]] = {
    "kernels": frozenset({"torch", "transformers"}),
    "fpga": frozenset({"torch", "transformers"}),
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__) for every .py under root/package."""
    out = {}
    for file in sorted((root / package).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts.pop()
        out[".".join(parts)] = (file, is_init)
    return out


def _owner(name: str, known: dict) -> str:
    """The longest known module that `name` (a module or a module.attribute) lies in."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(
    root: Path, package: str
) -> tuple[dict[str, list[Edge]], dict[str, list[tuple[str, int]]]]:
    """(internal edges by module, third-party top-level imports by module)."""
    known = modules(root, package)
    edges: dict[str, list[Edge]] = {name: [] for name in known}
    external: dict[str, list[tuple[str, int]]] = {name: [] for name in known}
    for name, (file, is_init) in known.items():
        here = name.split(".") if is_init else name.split(".")[:-1]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                for alias in node.names:
                    sub = f"{base_name}.{alias.name}"
                    targets.append(sub if sub in known else base_name)
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top != package:
                    external[name].append((top, node.lineno))
                    continue
                owner = _owner(target, known)
                if owner != name:
                    edges[name].append(Edge(name, owner, node.lineno))
    return edges, external


def cycles(edges: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One circle (as its edges, closing on its first module) per strongly connected
    component of more than one module (Tarjan)."""
    succ = {m: sorted({e.target for e in es}) for m, es in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, ()):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(succ) + 100))
    try:
        for v in sorted(succ):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)

    found = []
    for component in components:
        inside = set(component)
        start = component[0]
        # Shortest path start -> ... -> start inside the component (breadth first).
        parent: dict[str, Edge] = {}
        frontier = [start]
        closing = None
        while frontier and closing is None:
            following = []
            for v in frontier:
                for e in edges[v]:
                    if e.target == start:
                        closing = e
                        break
                    if e.target in inside and e.target not in parent and e.target != start:
                        parent[e.target] = e
                        following.append(e.target)
                if closing is not None:
                    break
            frontier = following
        assert closing is not None, component
        path = [closing]
        while path[0].source != start:
            path.insert(0, parent[path[0].source])
        found.append(path)
    return found


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            match = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if match and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def _show(path: list[Edge]) -> str:
    return " -> ".join([path[0].source] + [f"{e.target} (line {e.line})" for e in path])


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, list[Edge]], dict[str, list[tuple[str, int]]]]:
    return import_graph(HOST, PACKAGE)


def test_the_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    """The reader finds module-level, function-local, relative and `from P import sub`
    imports, and reports a circle made of them with its path."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import toy.b\nimport numpy as np\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import thing\n")
    (pkg / "sub" / "c.py").write_text("thing = 1\n\n\ndef g():\n    from ..a import x\n")
    edges, external = import_graph(tmp_path, "toy")
    assert [str(e) for e in edges["toy.b"]] == ["toy.b -> toy.sub.c (line 2)"]
    assert [e.target for e in edges["toy.sub"]] == ["toy.sub.c"]
    assert external["toy.a"] == [("numpy", 2)]
    (path,) = cycles(edges)
    assert _show(path) == ("toy.a -> toy.b (line 1) -> toy.sub.c (line 2) -> toy.a (line 5)")
    (pkg / "sub" / "c.py").write_text("thing = 1\n")
    assert cycles(import_graph(tmp_path, "toy")[0]) == []


def test_every_module_has_a_layer(graph) -> None:
    edges, _ = graph
    missing = sorted(m for m in edges if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"
    assert set(MAY_IMPORT) == set(LAYERS)


def test_no_import_circle(graph) -> None:
    edges, _ = graph
    found = []
    for path in cycles(edges):
        members = sorted({e.source for e in path})
        found.append(f"{_show(path)}  [a circle through {', '.join(members)}]")
    assert not found, "import circles:\n" + "\n".join(found)


def test_no_upward_import(graph) -> None:
    edges, _ = graph
    bad = []
    for source, out in edges.items():
        for edge in out:
            have, want = layer_of(source), layer_of(edge.target)
            if want != have and want not in MAY_IMPORT[have]:
                bad.append(f"{edge}: layer {have!r} may not import layer {want!r}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_kernels_and_fpga_import_no_torch(graph) -> None:
    """Neither directly nor through the hetmem modules they import."""
    edges, external = graph
    bad = []
    for module in edges:
        banned = NO_EXTERNAL.get(layer_of(module) or "", frozenset())
        if not banned:
            continue
        reached, todo = {module}, [module]
        while todo:
            for edge in edges[todo.pop()]:
                if edge.target not in reached:
                    reached.add(edge.target)
                    todo.append(edge.target)
        bad += [
            f"{module} imports {top}"
            + ("" if via == module else f" through {via}")
            + f" (line {line} of {via})"
            for via in sorted(reached)
            for top, line in external[via]
            if top in banned
        ]
    assert not bad, "\n".join(bad)


def test_moved_names_are_still_where_users_import_them() -> None:
    """The circles were broken by moving names to neutral modules; the old homes re-export
    the same objects, and the tasks name the bundled tokenizer the bundled package holds."""
    from hetmem import bundled, errors, pipeline, placement, tasks
    from hetmem.fpga import cosim, hls, implementations
    from hetmem.methods import bm25_rag, reretrieve

    wrap = importlib.import_module("hetmem.models.wrap")  # hetmem.models.wrap is the function

    assert bm25_rag.ReRetriever is reretrieve.ReRetriever
    assert bm25_rag.Retrieved is reretrieve.Retrieved
    assert bm25_rag.Firing is reretrieve.Firing
    assert pipeline.normalize_placement is placement.normalize_placement
    assert pipeline.DEFAULT_PLACEMENT is placement.DEFAULT_PLACEMENT
    assert wrap.UnsupportedModel is errors.UnsupportedModel
    assert cosim.RTL_KERNELS is implementations.RTL_KERNELS
    assert hls.HLS_KERNELS is implementations.HLS_KERNELS
    assert bundled.path() / "tokenizer.json" == tasks.BUNDLED_TOKENIZER
