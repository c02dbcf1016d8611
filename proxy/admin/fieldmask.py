"""`/config_dump?mask=`: a FieldMask applied to protobuf messages as Envoy applies it. Pure.

Envoy reads the mask with protobuf's FieldMaskUtil::FromString (paths split
at commas, empty ones dropped), checks every path against the message
(GetFieldDescriptors: each step a field of the message it is in, and every
step but the last a singular message field), and trims the message
(FieldMaskUtil::TrimMessage: a field not on any path is cleared; a message on
a path that goes on is trimmed in turn; a field at a path's end is kept
whole). No paths at all trims nothing.

With `?resource=`, each element of that repeated field is masked on its own,
and the Any inside it (a StaticCluster's `cluster`, a StaticListener's
`listener`) can be masked through: Envoy splits each path at its first step;
a path that starts at the Any field masks the message packed inside by the
rest of the path (`cluster.name` keeps the cluster's name), the others mask
the element itself (`last_updated`). `cluster` alone leaves an empty inner
path, which no message has: Envoy then refuses the mask, and so does this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import any_pb2, message


def paths(mask: str) -> list[str]:
    """The paths of a mask as FieldMaskUtil::FromString reads them."""
    return [p for p in mask.split(",") if p]


def valid(descriptor: Any, path: str) -> bool:
    """Whether `path` names a field of messages of `descriptor` (GetFieldDescriptors)."""
    steps = path.split(".")
    for i, step in enumerate(steps):
        if descriptor is None:
            return False
        field = descriptor.fields_by_name.get(step)
        if field is None:
            return False
        last = i == len(steps) - 1
        if not last and (field.is_repeated or field.message_type is None):
            return False
        descriptor = field.message_type
    return True


def _tree(mask_paths: Sequence[str]) -> dict[str, Any]:
    """Paths as a tree of field names; None marks a field kept whole (a path ends there)."""
    root: dict[str, Any] = {}
    for path in mask_paths:
        node: dict[str, Any] | None = root
        steps = path.split(".")
        for step in steps[:-1]:
            if node is None:
                break
            if step in node and node[step] is None:
                node = None  # a shorter path keeps this field whole already
                break
            node = node.setdefault(step, {})
        if node is not None:
            node[steps[-1]] = None
    return root


def trim(msg: message.Message, mask_paths: Sequence[str]) -> bool:
    """Trim `msg` in place to the fields on `mask_paths`; False (untouched) if a path is not valid."""
    if not all(valid(msg.DESCRIPTOR, p) for p in mask_paths):
        return False
    if mask_paths:
        _trim(msg, _tree(mask_paths))
    return True


def _trim(msg: message.Message, tree: dict[str, Any]) -> None:
    for field, value in msg.ListFields():
        if field.name not in tree:
            msg.ClearField(field.name)
        elif tree[field.name] is not None:
            _trim(value, tree[field.name])


def trim_resource(msg: message.Message, mask_paths: Sequence[str]) -> bool:
    """Envoy's trimResourceMessage: the mask applied to one element of `?resource=`, through its Any."""
    descriptor = msg.DESCRIPTOR
    outer: list[str] = []
    inner: list[str] = []
    any_field = None
    for path in mask_paths:
        first, _, rest = path.partition(".")
        field = descriptor.fields_by_name.get(first)
        if field is not None and not field.is_repeated and field.message_type is not None \
                and field.message_type.full_name == "google.protobuf.Any":
            any_field = first  # a config dump element has one Any field
            outer.append(first)
            inner.append(rest)
        else:
            outer.append(path)
    if any_field is not None and msg.HasField(any_field):
        packed: any_pb2.Any = getattr(msg, any_field)
        from ..config.envoy import schema  # the packed message's class, by its type URL
        content = schema.message_class(packed.type_url.rpartition("/")[2])()
        if not packed.Unpack(content) or not trim(content, inner):
            return False
        packed.Pack(content)
    return trim(msg, outer)
