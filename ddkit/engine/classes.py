"""Whether two category lists are the same classes (ids and names), told in one line: the first class that differs."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ddkit.errors import ConfigError


def pairs(categories: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """``[(id, name)]`` of a category list, in its order."""
    return [(int(c["id"]), str(c.get("name"))) for c in categories]


def first_class_difference(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]],
                           our_side: str = "teacher", their_side: str = "data") -> str | None:
    """``None`` when the categories are the same ``(id, name)`` pairs in the same order, else the first that differs,
    as text (``id 0: teacher 'person' vs data 'bicycle'``)."""
    a, b = pairs(ours), pairs(theirs)
    if a == b:
        return None
    names_a, names_b = dict(a), dict(b)
    for (id_a, name_a), (id_b, name_b) in zip(a, b):
        if id_a == id_b and name_a != name_b:
            return f"id {id_a}: {our_side} {name_a!r} vs {their_side} {name_b!r}"
        if id_a != id_b:
            other = names_b.get(id_a)
            return (f"id {id_a}: {our_side} {name_a!r} vs {their_side} "
                    + (repr(other) if other is not None else f"none ({their_side} {name_b!r} is id {id_b})"))
    longer, side = (a, our_side) if len(a) > len(b) else (b, their_side)
    extra = longer[min(len(a), len(b))]
    return (f"{len(a)} {our_side} class(es) vs {len(b)} {their_side} class(es) (id {extra[0]} {extra[1]!r} only "
            f"the {side}'s)")


def check_classes(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]], our_src: str,
                  their_src: str, fix: str, our_side: str = "model", their_side: str = "data") -> None:
    """Refuse, in one line naming both sources, the first differing class, ``fix`` and the names ``ours`` lacks,
    categories that are not the same ``(id, name)`` pairs: labels are passed on by id, so a name under another id
    would be another class."""
    diff = first_class_difference(ours, theirs, our_side, their_side)
    if diff is None:
        return
    missing = sorted({name for _, name in pairs(theirs)} - {name for _, name in pairs(ours)})
    hint = f" (the {our_side} has no class named {', '.join(map(repr, missing[:4]))})" if missing else ""
    raise ConfigError(f"{their_src}: its categories ({len(theirs)}) are not the {our_side}'s ({len(ours)}, "
                      f"{our_src}): {diff}; {fix}{hint}")


def data_where(data: Mapping[str, Any] | None) -> str:
    """The recipe's data section as a user wrote it: its first dataset block and the file or folder it reads."""
    for part in ("train", "labeled", None):
        block = (data or {}).get(part) if part else data
        ds = block.get("dataset") if isinstance(block, Mapping) else None
        if isinstance(ds, Mapping):
            file = next((ds[k] for k in ("annotations", "yaml", "root", "path", "file") if ds.get(k)), None)
            return f"data.{part + '.' if part else ''}dataset ({ds.get('name')}{': ' + str(file) if file else ''})"
    return "data"
