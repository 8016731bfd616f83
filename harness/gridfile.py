"""Reading a grid or search file: safe YAML, and the one error type that lists every problem with a file.

YAML is read with a SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently) and reads
`1e-4` as a float (YAML 1.1 wants `1.0e-4`); a file is refused before parsing when it is over a size no grid
needs, and after parsing when its aliases expand to more values than any grid holds (an "alias bomb").
`harness.grid` and `harness.search` build on it. Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from experiments import data as D


class GridError(Exception):
    """One or more problems with a grid file; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-4 as a float (YAML 1.1 wants 1.0e-4)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line}; first defined on line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_GRID_BYTES = 1_000_000  # a grid is a page of YAML; anything near this is a mistake or an attack
MAX_GRID_VALUES = 100_000  # values after YAML aliases are expanded (an "alias bomb" nests them exponentially)


def _expanded_size(value: Any, limit: int) -> int:
    """Number of values in `value` with aliases counted every time they are used, stopping past `limit`
    (PyYAML shares aliased objects, so a 1 kB file can stand for billions of values)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_yaml(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GridError([f"{path}: cannot read: {e.strerror}"]) from None
    if size > MAX_GRID_BYTES:
        raise GridError([f"{path}: {size} bytes; a grid file is at most {MAX_GRID_BYTES} bytes"])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GridError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise GridError([f"{path}: {D.not_utf8(path.read_bytes())}; a grid file must be saved as UTF-8"]) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.YAMLError as e:
        raise GridError([f"{path}: invalid YAML: {e}"]) from None
    if _expanded_size(data, MAX_GRID_VALUES) > MAX_GRID_VALUES:
        raise GridError([f"{path}: expands to more than {MAX_GRID_VALUES} values once its YAML aliases (*name) "
                         f"are followed; a grid needs far fewer (nested aliases multiply)"])
    return data
