"""The tree of region paths (``forward/encoder/attention``), with a cap on how many exist.

Nesting and explicit paths build the same tree: ``span("forward")`` around ``span("encoder")``
and a bare ``span("forward/encoder")`` both resolve to the node ``forward/encoder``. Names may be
any Unicode. The number of nodes is capped; past the cap every new path resolves to the
``(overflow)`` node, with one warning.

Each node also has the ``path`` label value it is *exported* under (:attr:`PathNode.export`).
With ``fold_indices`` (the default) the index of a repeated layer is folded: ``LM/layers.17/attn``
is exported as ``LM/layers.*/attn``, so a 32-layer model adds the series of one layer, not 32.
Traces and the end-of-run summary keep the full path.

Example::

    tree = PathTree(max_paths=100)
    node = tree.resolve(tree.root, ("forward", "encoder"))
    node.path  # 'forward/encoder'
"""

from __future__ import annotations

import re
import threading

from otel_ml import names
from otel_ml._logging import warn_once

OVERFLOW = "(overflow)"
SEPARATOR = "/"
#: ``layers.17`` -> ``layers.*``: the items of a ``ModuleList``/``ModuleDict`` named by index.
_INDEX = re.compile(r"\.\d+$")


def fold(name: str) -> str:
    """One path part with a trailing ``.<index>`` folded to ``.*``."""
    return _INDEX.sub(".*", name)


class PathNode:
    """One region path; ``label`` is its bounded-length value, ``export`` the one it is exported as."""

    __slots__ = ("children", "depth", "export", "folded", "label", "name", "parent", "path")

    def __init__(self, name: str, parent: PathNode | None, fold_indices: bool = True) -> None:
        self.name = name
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.path = name if parent is None or not parent.path else parent.path + SEPARATOR + name
        self.label = names.label_value(self.path)
        part = fold(name) if fold_indices else name
        self.folded = part if parent is None or not parent.folded else parent.folded + SEPARATOR + part
        self.export = names.label_value(self.folded)
        self.children: dict[str, PathNode] = {}

    def __repr__(self) -> str:
        return f"PathNode({self.path!r})"


def split(name: str) -> tuple[str, ...]:
    """Path parts of a region name; empty parts are dropped, an empty name becomes ``(unnamed)``."""
    parts = tuple(part.strip() for part in names.valid_text(str(name)).split(SEPARATOR) if part.strip())
    return parts or ("(unnamed)",)


class PathTree:
    """Thread-safe path tree: lookups are lock-free dict reads, creation takes a lock.

    Example::

        tree = PathTree()
        tree.resolve(tree.root, split("data/collate")).path  # 'data/collate'
    """

    def __init__(self, max_paths: int = 1024, *, fold_indices: bool = True) -> None:
        self.root = PathNode("", None)
        self.overflow = PathNode(OVERFLOW, self.root)
        self.max_paths = max_paths
        self.fold_indices = fold_indices
        self.count = 0
        self._lock = threading.Lock()

    def resolve(self, parent: PathNode, parts: tuple[str, ...]) -> PathNode:
        node = parent
        for part in parts:
            if node is self.overflow:
                return node
            child = node.children.get(part)
            node = child if child is not None else self._create(node, part)
        return node

    def _create(self, parent: PathNode, name: str) -> PathNode:
        with self._lock:
            existing = parent.children.get(name)
            if existing is not None:
                return existing
            if self.count >= self.max_paths:
                warn_once(
                    "max-paths",
                    "otel_ml: more than %d distinct span paths; %r and later new paths are counted "
                    "under %r (raise OTEL_ML_MAX_SPAN_PATHS if this is intended)",
                    self.max_paths,
                    f"{parent.path}/{name}" if parent.path else name,
                    OVERFLOW,
                )
                return self.overflow
            node = PathNode(name, parent, self.fold_indices)
            parent.children[name] = node
            self.count += 1
            return node

    def walk(self) -> list[PathNode]:
        """All nodes below the root, depth first, siblings in creation order."""
        out: list[PathNode] = []
        stack = list(reversed(self.root.children.values()))
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(node.children.values()))
        return out
