"""The package reads top-down: no import cycles, dependencies point one way, modules say what they do.

The import graph comes from the source (``tests/support/imports.py``): lazy imports inside
functions count, so a cycle cannot hide behind one.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from tests.support.imports import cycles, discover, graph, levels

ROOT = Path(__file__).resolve().parents[1] / "otel_ml"

#: Layers, lowest first. A module may import its own layer and those below, never above.
#: Entries are module names or package prefixes ending in ".".
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "names, settings, values",
        (
            "otel_ml._version", "otel_ml._logging", "otel_ml._envparse", "otel_ml._settings",
            "otel_ml.semconv", "otel_ml.names", "otel_ml.values", "otel_ml.rundir",
            "otel_ml.console", "otel_ml.health", "otel_ml.histogram", "otel_ml.detectors",
            "otel_ml._cdetectors", "otel_ml._cbuild",
            "otel_ml.collection", "otel_ml.anomaly_config", "otel_ml.config", "otel_ml.ranks",
            "otel_ml.gpu", "otel_ml.threads", "otel_ml.observables", "otel_ml.distribution",
            "otel_ml.score_lines", "otel_ml.tensor_summary", "otel_ml.sources",
        ),
    ),
    ("pipeline and exporters", ("otel_ml.pipeline", "otel_ml.exporters", "otel_ml.exporters.")),
    (
        "features",
        (
            "otel_ml.regions", "otel_ml.regions.", "otel_ml.progress", "otel_ml.progress.",
            "otel_ml.training", "otel_ml.anomaly", "otel_ml.system", "otel_ml.signals", "otel_ml.stopping",
            "otel_ml.offline", "otel_ml.offline.", "otel_ml.status", "otel_ml.distribution_metrics",
        ),
    ),
    # otel_ml.scores reads the running instance, as the module functions of runtime do.
    ("runtime", ("otel_ml.runtime", "otel_ml.scores")),
    ("entry points", ("otel_ml", "otel_ml.cli", "otel_ml.cli.", "otel_ml._testing")),
    # Framework glue on top of the public API: nothing in otel_ml imports it.
    ("integrations", ("otel_ml.integrations", "otel_ml.integrations.")),
)  # fmt: skip


def _layer(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or (m.endswith(".") and module.startswith(m)) for m in members):
            return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS in {__file__}")


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root / "pkg"


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(graph(ROOT)) == []


def test_the_cycle_check_finds_cycles_however_they_are_written(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import run\nVERSION = '1'\n",
            "pkg/a.py": "from pkg import b\n\ndef run():\n    return b\n",
            "pkg/b.py": "def late():\n    from . import c\n    return c\n",  # lazy and relative
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
            "pkg/e.py": "from pkg.d import TYPE_CHECKING\n",
            "pkg/sub/__init__.py": "from pkg.sub.f import X\n",
            "pkg/sub/f.py": "from pkg import VERSION\nX = VERSION\n",
        },
    )
    found = cycles(graph(pkg))
    assert ["pkg.a", "pkg.b", "pkg.c"] in found  # a -> b -> (lazily) c -> a
    assert not any("pkg.d" in c for c in found)  # a TYPE_CHECKING import never runs
    # f reads a name from the root __init__, which imports a, which (through c) ... is not f:
    # no cycle there, but make the root import f and reading VERSION from it is one.
    (pkg / "__init__.py").write_text("from pkg.sub.f import X\nVERSION = '1'\n", encoding="utf-8")
    assert ["pkg", "pkg.sub", "pkg.sub.f"] in cycles(graph(pkg))


def test_a_c_extension_is_a_module_of_the_graph(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/fast.c": "PyMODINIT_FUNC PyInit_fast(void) {}\n",
            "pkg/x.py": "from pkg import fast\n",
        },
    )
    assert graph(pkg)["pkg.x"] == {"pkg.fast"}


def test_dependencies_point_down_the_layers() -> None:
    edges = graph(ROOT)
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(edges.items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_import_levels_stay_few() -> None:
    # Before the restructuring 8 modules formed one cycle (4 back-edges); after it there are 9
    # levels (0-8) and no back-edge. A chain growing deeper is a sign of a new tangle.
    assert max(levels(graph(ROOT)).values()) <= 9


def test_every_module_says_what_it_does_and_a_long_one_says_why() -> None:
    for name, path in discover(ROOT).items():
        if path.suffix != ".py":
            continue
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.splitlines()[0].strip(), f"{name}: no module docstring"
        lines = text.count("\n")
        if lines > 400:
            assert "Over 400 lines" in doc, f"{name}: {lines} lines and no reason in its docstring"


@pytest.mark.parametrize("package", ["regions", "progress", "cli", "exporters"])
def test_each_package_names_its_public_api(package: str) -> None:
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    names = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
    ]
    assert names, f"otel_ml/{package}/__init__.py has no __all__"
