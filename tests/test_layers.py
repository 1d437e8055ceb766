"""The import contract (DESIGN.md, "Layout"): who may import whom.

The graph is read from the source with ``ast`` (nothing is imported), so a broken import shows up
here as a named edge rather than as an ImportError somewhere else. Three kinds of import are kept
apart:

- ``top``: runs when the module is imported (module level, class bodies, ``try``/``if`` blocks);
- ``typing``: under ``if TYPE_CHECKING:`` (never runs);
- ``function``: inside a function body (runs when the function is called).

Contract:

(a) ``channels`` never imports ``flowcodec`` (any kind);
(b) no cycles among ``top`` imports;
(c) ground modules import nothing from a higher layer (any kind).

Run ``python tests/test_layers.py`` to print the graph's cycles and layer violations.
"""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowcodec", "channels")

# Layers, bottom up. A module is placed by the longest prefix that names it.
GROUND = (
    "channels",
    "flowcodec._moved",
    "flowcodec.bitstream",
    "flowcodec.framing",
    "flowcodec.shapes",
    "flowcodec.flops",
    "flowcodec.views",
    "flowcodec.errors",
    "flowcodec.progress",
    "flowcodec.training",
)
MODELS = ("flowcodec.family", "flowcodec.codecs")
TRAINING = (
    "flowcodec.train",
    "flowcodec.codecs.train",
    "flowcodec.codecs.train_task",
    "flowcodec.codecs.jscc_train",
    "flowcodec.family.train",
)
FLOW = ("flowcodec.pipeline", "flowcodec.policy", "flowcodec.split")
COMMANDS = (
    "flowcodec.rd",
    "flowcodec.snr",
    "flowcodec.latency",
    "flowcodec.demo",
    "flowcodec.cli",
    "flowcodec.serve",
    "flowcodec.scale",
    "flowcodec.sweeps",
)
LAYERS = {"ground": 0, "models": 1, "training": 2, "flow": 3, "commands": 4}
_PREFIXES = [
    *((p, "ground") for p in GROUND),
    *((p, "models") for p in MODELS),
    *((p, "training") for p in TRAINING),
    *((p, "flow") for p in FLOW),
    *((p, "commands") for p in COMMANDS),
]


def layer_of(module: str) -> str | None:
    """The layer of ``module`` by its longest listed prefix; None where none is listed."""
    if module == "flowcodec":  # the package's __init__: bitstream and errors only
        return "ground"
    best = None
    for prefix, layer in _PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the two packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """Yield (kind, node) for every import statement, kind in top/typing/function."""

    def walk(node, kind):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield kind, child
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test) and kind == "top":
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "top")
            else:
                yield from walk(child, kind)

    # walk() looks at children; wrap single statements so the import itself is seen
    yield from walk(tree, "top")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, set[str]]]:
    """{kind: {module: {imported internal modules}}} over flowcodec/ and channels/."""
    files = module_files()
    known = set(files)
    graph: dict[str, dict[str, set[str]]] = {
        k: defaultdict(set) for k in ("top", "typing", "function")
    }

    def internal(name: str) -> str | None:
        # the longest known module that is ``name`` or a parent of it
        while name:
            if name in known:
                return name
            name = name.rpartition(".")[0]
        return None

    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for kind, node in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for target in targets:
                hit = internal(target)
                if hit is not None and hit != module:
                    graph[kind][module].add(hit)
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    nodes = set(edges) | {t for ts in edges.values() for t in ts}

    def strong(v: str) -> None:
        # iterative Tarjan: deep graphs must not hit the recursion limit
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return sorted(out)


def layer_violations(graph, layers=("ground",)) -> list[str]:
    """Imports from a higher layer by modules of ``layers``, as 'kind: a -> b (layer)' lines.

    A ground module must not import an unlisted flowcodec module either (``data``,
    ``config``, ...): whatever the ground floor needs is listed as ground."""
    out = []
    for kind, edges in graph.items():
        for src, targets in sorted(edges.items()):
            src_layer = layer_of(src)
            if src_layer not in layers:
                continue
            for dst in sorted(targets):
                dst_layer = layer_of(dst)
                if dst_layer is not None and LAYERS[dst_layer] > LAYERS[src_layer]:
                    out.append(f"{kind}: {src} -> {dst} ({dst_layer})")
                elif dst_layer is None and src_layer == "ground" and dst.startswith("flowcodec"):
                    out.append(f"{kind}: {src} -> {dst} (unlisted)")
    return out


def test_graph_sees_the_packages():
    graph = import_graph()
    assert "flowcodec.bitstream" in module_files()
    assert graph["top"], "no imports found: the reader is broken"
    assert "channels.analog" in graph["top"]["channels.link"]


def test_channels_never_imports_flowcodec():
    graph = import_graph()
    bad = [
        f"{kind}: {src} -> {dst}"
        for kind, edges in graph.items()
        for src, targets in edges.items()
        if src.startswith("channels")
        for dst in targets
        if dst.startswith("flowcodec")
    ]
    assert bad == []


def test_no_cycles_among_top_level_imports():
    graph = import_graph()
    assert cycles(graph["top"]) == []


def test_ground_imports_nothing_above_it():
    assert layer_violations(import_graph()) == []


def test_ground_modules_exist():
    files = module_files()
    for name in ("flowcodec.shapes", "flowcodec.flops", "flowcodec.views", "channels.registry"):
        assert name in files, name


def test_channel_registry_finds_channels_by_name():
    import channels

    for name in channels.list_channels():
        assert isinstance(name, str)
    ch = channels.make_channel("awgn", snr_db=10.0)
    assert isinstance(ch, channels.AWGN)


@pytest.mark.parametrize(("old", "name", "new"), [
    ("flowcodec.split", "FeatureShape", "flowcodec.shapes"),
    ("flowcodec.split", "LAYOUTS", "flowcodec.shapes"),
    ("flowcodec.split", "layout_of", "flowcodec.shapes"),
    ("flowcodec.family.base", "count_flops", "flowcodec.flops"),
    ("flowcodec.codecs.task", "VIEWS", "flowcodec.views"),
    ("flowcodec.codecs.task", "view_features", "flowcodec.views"),
])  # fmt: skip
def test_moved_names_work_from_their_old_place_for_a_release_with_a_warning(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{new}.{name}"):
        obj = getattr(importlib.import_module(old), name)
    assert obj is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        importlib.import_module(old).no_such_name  # noqa: B018


def test_old_channel_lookup_is_the_registry():
    import channels
    from flowcodec.codecs import jscc_train

    assert jscc_train.make_channel is channels.make_channel
    assert list(jscc_train.CHANNELS) == ["awgn", "rayleigh", "rayleigh-block", "ofdm-tdla",
                                         "ofdm-tdlc"]  # fmt: skip
    with pytest.raises(channels.ChannelError, match="unknown channel 'wifi'"):
        channels.make_channel("wifi")


if __name__ == "__main__":
    g = import_graph()
    for kind in ("top", "typing", "function"):
        n = sum(len(v) for v in g[kind].values())
        print(f"{kind}: {n} edges")
    top = cycles(g["top"])
    print(f"cycles among top-level imports: {len(top)}")
    for comp in top:
        print("  ", " ".join(comp))
    both = {m: g["top"].get(m, set()) | g["function"].get(m, set()) for m in module_files()}
    allc = cycles(both)
    print(f"cycles counting function-level imports too: {len(allc)}")
    for comp in allc:
        print("  ", len(comp), "modules:", " ".join(comp))
    for line in layer_violations(g):
        print("violation:", line)
    rest = layer_violations(g, layers=tuple(LAYERS))
    print(f"imports from a higher layer, all layers: {len(rest)}")
    for line in rest:
        print("  ", line)
