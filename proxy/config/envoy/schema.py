"""Envoy's own schema: a bootstrap read into `envoy.config.bootstrap.v3.Bootstrap`.

The messages come from `xds-protos` (Envoy's data-plane-api, generated for
Python by the gRPC project), so the schema is Envoy's, field for field:

* `parse` reads plain data (a YAML or JSON bootstrap) with protobuf's
  `json_format`, which takes proto names and JSON names (`static_resources`,
  `staticResources`) and rejects unknown fields, as Envoy does (unless
  `--allow-unknown-static-fields`). Every `typed_config` names its message
  by type URL; the module that defines it is imported first, found by the
  message's package (`envoy.extensions.filters.network.tcp_proxy.v3` ->
  that folder's `*_pb2` modules), so only what a bootstrap uses is loaded;
* `read_binary` and `read_text` do the same for `.pb` and `.pb_text` files;
* `validate.py` then checks the protoc-gen-validate rules the messages
  carry, which json_format does not.

A failure is a ConfigError whose `where` is the field path with proto names
(`static_resources.listeners[0].address`), whatever spelling the file used.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from google.protobuf import any_pb2, json_format, message, symbol_database, text_format, unknown_fields

from ..values import ConfigError

BOOTSTRAP = "envoy.config.bootstrap.v3.Bootstrap"
TYPE_PREFIX = "type.googleapis.com/"
# Packages whose messages a type URL may name (xds-protos and protobuf's own).
ROOTS = ("envoy", "xds", "udpa", "validate", "google.protobuf")


def bootstrap_class() -> type[message.Message]:
    return message_class(BOOTSTRAP)


def message_class(full_name: str) -> type[message.Message]:
    """The class of a message by its full name, importing its package's modules first."""
    _import_package(full_name.rpartition(".")[0])
    try:
        cls: type[message.Message] = symbol_database.Default().GetSymbol(full_name)
    except KeyError:
        raise LookupError(full_name) from None
    return cls


@cache
def _import_package(package: str) -> None:
    """Import every *_pb2 module of a proto package (a folder of xds-protos).

    A nested message's "package" is its parent message: the folder is then
    found by walking up until one exists.
    """
    parts = package.split(".")
    if not parts or parts[0] not in {r.split(".")[0] for r in ROOTS}:
        return
    while parts:
        try:
            module = importlib.import_module(".".join(parts))
        except ImportError:
            parts.pop()
            continue
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{module.__name__}.{info.name}")
        return


def type_urls(data: Any) -> Iterator[str]:
    """Every "@type" in plain data, at any depth."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "@type" and isinstance(value, str):
                yield value
            else:
                yield from type_urls(value)
    elif isinstance(data, list):
        for item in data:
            yield from type_urls(item)


def _import_types(urls: Iterator[str]) -> None:
    for url in urls:
        name = url.rpartition("/")[2]
        if name:
            _import_package(name.rpartition(".")[0])


def parse(data: Any, allow_unknown: bool = False) -> message.Message:
    """Plain data (YAML or JSON) -> a Bootstrap message, or a ConfigError naming the field."""
    bootstrap = bootstrap_class()()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"a bootstrap is a mapping, not {type(data).__name__}")
    _import_types(type_urls(data))
    try:
        data = lenient(data, bootstrap.DESCRIPTOR)
        json_format.ParseDict(data, bootstrap, ignore_unknown_fields=allow_unknown)
    except json_format.ParseError as exc:
        where, problem = parse_error(str(exc))
        raise ConfigError(where, problem) from None
    except (TypeError, ValueError, RecursionError) as exc:  # protobuf's own surprises: still one line
        raise ConfigError("", f"not a bootstrap: {exc}") from None
    return bootstrap


# --- Envoy's JSON reading is more lenient than protobuf's Python one ---------------------------

WRAPPERS = {f"google.protobuf.{n}Value" for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool",
                                                  "String", "Bytes")}


def lenient(data: Any, desc: Any) -> Any:
    """Plain data as Envoy 1.40 reads it, rewritten into what json_format takes.

    Checked with Envoy's --mode validate, Envoy also takes: a Duration or
    Timestamp written as a message ({seconds: 5, nanos: 0}), a wrapper as a
    message ({value: 80}), a bool as the string "true" or "false", and an
    enum value in any case (inbound). Each becomes its canonical JSON here;
    anything else is left for json_format to accept or refuse.
    """
    if not isinstance(data, dict):
        return data
    fields = {**{f.json_name: f for f in desc.fields}, **{f.name: f for f in desc.fields}}
    out = {}
    for key, value in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None or value is None:
            out[key] = value
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[key] = {k: _lenient_value(v, value_field) for k, v in value.items()} if isinstance(value, dict) \
                else value
        elif field.is_repeated and isinstance(value, list):
            out[key] = [_lenient_value(v, field) for v in value]
        else:
            out[key] = _lenient_value(value, field)
    return out


def _lenient_value(value: Any, field: Any) -> Any:
    message_type = field.message_type
    if message_type is None:
        if field.enum_type is not None and isinstance(value, str):
            names = {name.lower(): name for name in field.enum_type.values_by_name}
            return names.get(value.lower(), value)
        if field.type == field.TYPE_BOOL and value in ("true", "false"):
            return value == "true"
        return value
    name = message_type.full_name
    if name in ("google.protobuf.Duration", "google.protobuf.Timestamp") and isinstance(value, dict) \
            and set(value) <= {"seconds", "nanos"}:
        return _duration_text(value) if name == "google.protobuf.Duration" else value
    if name in WRAPPERS:
        if isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]
        return _lenient_value(value, message_type.fields_by_name["value"])
    if name == "google.protobuf.Any" and isinstance(value, dict) and isinstance(value.get("@type"), str):
        try:
            inner = message_class(value["@type"].rpartition("/")[2])
        except LookupError:
            return value  # json_format names the type it cannot find
        return lenient(value, inner.DESCRIPTOR)
    if name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"):
        return value
    return lenient(value, message_type)


def _duration_text(value: dict[str, Any]) -> Any:
    """{seconds, nanos} as JSON's "1.5s"; left alone if it is not numbers (json_format then says why)."""
    try:
        seconds, nanos = int(value.get("seconds", 0)), int(value.get("nanos", 0))
    except (TypeError, ValueError):
        return value
    sign = "-" if seconds < 0 or nanos < 0 else ""
    seconds, nanos = abs(seconds), abs(nanos)
    return f"{sign}{seconds}.{nanos:09d}s" if nanos else f"{sign}{seconds}s"


def read_binary(blob: bytes, allow_unknown: bool = False) -> message.Message:
    """A `.pb` file: the binary encoding of a Bootstrap, whose unknown fields Envoy refuses too."""
    bootstrap = bootstrap_class()()
    try:
        bootstrap.ParseFromString(blob)
    except message.DecodeError as exc:
        raise ConfigError("", f"not a binary Bootstrap: {exc}") from None
    for any_message in anys(bootstrap):
        _import_types(iter([any_message.type_url]))
    if not allow_unknown:
        _no_unknown_fields(bootstrap, "")
    return bootstrap


def _no_unknown_fields(msg: message.Message, where: str) -> None:
    """What binary input carries that the schema does not know (text and JSON never get that far)."""
    found = unknown_fields.UnknownFieldSet(msg)
    if len(found):
        numbers = ", ".join(str(found[i].field_number) for i in range(len(found)))
        raise ConfigError(where, f"message {msg.DESCRIPTOR.full_name} has unknown fields ({numbers})")
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        at = f"{where}.{field.name}" if where else field.name
        if _is_map(field):
            items = [(f"{at}[{k!r}]", v) for k, v in value.items()]
        elif field.is_repeated:
            items = [(f"{at}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(at, value)]
        for path, item in items:
            if isinstance(item, any_pb2.Any):
                _no_unknown_fields(unpack(item, path), path)
            elif isinstance(item, message.Message):
                _no_unknown_fields(item, path)


def read_text(text: str) -> message.Message:
    """A `.pb_text` file: the text format of a Bootstrap."""
    bootstrap = bootstrap_class()()
    _import_types(iter(re.findall(r"\[\s*([\w./]+)\s*\]", text)))
    try:
        text_format.Parse(text, bootstrap)
    except text_format.ParseError as exc:
        raise ConfigError("", f"not a text Bootstrap: {exc}") from None
    return bootstrap


def to_data(msg: message.Message) -> dict[str, Any]:
    """A message as plain data in Envoy's JSON form (proto field names, as /config_dump writes them)."""
    data: dict[str, Any] = json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))
    return data  # through JSON text: plain dicts and lists all the way down (Any gives OrderedDicts)


def unpack(packed: any_pb2.Any, where: str) -> Any:
    """The message inside an Any (its module imported on the way); Any-typed, as generated messages are."""
    name = packed.type_url.rpartition("/")[2]
    try:
        cls = message_class(name)
    except LookupError:
        raise ConfigError(where, f"unknown type {packed.type_url!r}") from None
    inner = cls()
    if not packed.Unpack(inner):
        raise ConfigError(where, f"cannot unpack {packed.type_url!r}")
    return inner


def anys(msg: message.Message) -> Iterator[any_pb2.Any]:
    """Every Any set in a message, at any depth (for binary input, whose types load late)."""
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        values = value.values() if _is_map(field) else value if field.is_repeated else [value]
        for item in values:
            if not isinstance(item, message.Message):
                continue
            if isinstance(item, any_pb2.Any):
                yield item
                continue
            yield from anys(item)


def _is_map(field: Any) -> bool:
    return bool(field.is_repeated and field.message_type is not None and field.message_type.GetOptions().map_entry)


# --- json_format's errors, as one line with a path ----------------------------------------

_AT = re.compile(r' at "?\w+\.([^"\s]+)"?$')
_FIELD = re.compile(r"^Failed to parse (\w+) field: ")


def parse_error(text: str) -> tuple[str, str]:
    """json_format's ParseError -> (field path, problem).

    Its text nests ("Failed to parse static_resources field: Failed to parse
    listeners field: ...") and often ends with the full path (" at
    Bootstrap.static_resources.listeners[0]"); the path is taken from there,
    else from the nesting.
    """
    text = text.split("\n")[0].strip().rstrip(".")
    fields = []
    while m := _FIELD.match(text):
        fields.append(m.group(1))
        text = text[m.end():]
    where = ".".join(fields)
    at = _AT.search(text)
    if at:
        where = at.group(1).rstrip(".").removesuffix(".value")
        text = text[:at.start()]
    text = text.rstrip(".").replace('Message type "', "message type \"")
    named = re.match(r'message type "([\w.]+)" has no field named "(\w+)"', text)
    if named:
        where, text = f"{where}.{named.group(2)}" if where else named.group(2), f"unknown field (in {named.group(1)})"
    return where, text
