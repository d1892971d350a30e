"""Safe YAML loading that remembers where every value came from.

Manifests are written by people; an error must point at ``file:line:col``. This loader builds plain
Python values from the composed node tree and keeps a map from each value's field path
(``spec.requires.min_vram_gb``) to its position. It refuses aliases (no billion-laughs expansion),
duplicate keys and non-string keys, which ``yaml.safe_load`` would silently accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["Document", "YamlError", "load_documents", "path_text"]

MAX_YAML_BYTES = 1_000_000
MAX_NODES = 100_000


@dataclass(frozen=True)
class YamlError:
    line: int
    column: int
    message: str


@dataclass
class Document:
    value: Any
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    line: int = 1

    def where(self, path: str) -> tuple[int, int]:
        """Position of ``path``, or of its nearest ancestor that has one."""
        while path:
            if path in self.positions:
                return self.positions[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return (self.line, 1)


def path_text(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.MarkedYAMLError(
                problem="YAML aliases (*name) are not allowed in manifests", problem_mark=event.start_mark
            )
        return super().compose_node(parent, index)


class _Builder:
    def __init__(self, loader: _NoAliasLoader, doc: Document, errors: list[YamlError]) -> None:
        self.loader = loader
        self.doc = doc
        self.errors = errors
        self.nodes = 0

    def build(self, node: yaml.Node, path: str) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise yaml.MarkedYAMLError(problem=f"document has more than {MAX_NODES} values",
                                       problem_mark=node.start_mark)
        self.doc.positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if not isinstance(key, str):
                    self.errors.append(YamlError(*where, f"{path or 'document'}: keys must be strings, "
                                                 f"got {key!r}"))
                    continue
                if key in out:
                    self.errors.append(YamlError(*where, f"{path_text(path, key)}: duplicate key {key!r}"))
                    continue
                self.doc.positions[path_text(path, key)] = where
                out[key] = self.build(value_node, path_text(path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path_text(path, i)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node)


def load_documents(text: str) -> tuple[list[Document], list[YamlError]]:
    """Parse every ``---`` document; return them with their positions and any errors found."""
    if len(text.encode()) > MAX_YAML_BYTES:
        return [], [YamlError(1, 1, f"file is larger than {MAX_YAML_BYTES} bytes")]
    loader = _NoAliasLoader(text)
    docs: list[Document] = []
    errors: list[YamlError] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = Document(value=None, line=node.start_mark.line + 1)
            doc.value = _Builder(loader, doc, errors).build(node, "")
            docs.append(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or str(exc)
        if "\t" in problem or "'\\t'" in problem:
            problem = "tab characters are not allowed for indentation in YAML; use spaces"
        errors.append(YamlError(line, col, f"invalid YAML: {problem}"))
    except yaml.YAMLError as exc:
        errors.append(YamlError(1, 1, f"invalid YAML: {exc}"))
    finally:
        loader.dispose()
    return docs, errors
