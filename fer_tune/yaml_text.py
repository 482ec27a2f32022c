"""YAML text read safely: no tags run (`yaml.safe_load`), and no file that would expand or nest
past what any spec needs. Pure: it reads text, never the disk, so the schema (`fer_tune.spec`,
for `--set` values) and file reading (`fer_tune.io`) share it."""

from __future__ import annotations

from typing import Any

from fer_tune.errors import UserError

MAX_YAML_VALUES = 100_000
"""More values than any spec has: a file past this expands aliases of aliases ("billion laughs")."""


MAX_YAML_DEPTH = 64
"""A spec nests a few levels (space entries, lists of them); deeper is not a spec."""


def safe_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` (no tags run), refusing quickly what would expand past MAX_YAML_VALUES,
    refer to itself, or nest deeper than Python can follow: each one line, not a hang or a traceback."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except RecursionError:
        raise UserError(f"{source}: YAML nested too deeply to read") from None
    finally:
        loader.dispose()
    if node is None:
        return None
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def expanded(n, depth: int = 0) -> int:
        if depth > MAX_YAML_DEPTH:
            raise UserError(f"{source}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels); refused")
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UserError(f"{source}: a YAML alias refers to the collection it is in; refused")
        open_nodes.add(key)
        children = (n.value if isinstance(n, yaml.SequenceNode) else
                    [part for pair in n.value for part in pair] if isinstance(n, yaml.MappingNode) else [])
        total = 1
        for child in children:
            total += expanded(child, depth + 1)
            if total > MAX_YAML_VALUES:
                raise UserError(f"{source}: YAML expands to more than {MAX_YAML_VALUES:,} values (aliases that "
                                f"repeat aliases); refused")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        expanded(node)
    except RecursionError:
        raise UserError(f"{source}: YAML nested too deeply to read") from None
    return yaml.safe_load(text)

