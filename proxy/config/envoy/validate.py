"""The protoc-gen-validate rules of Envoy's messages, checked as Envoy checks them.

Envoy's protos carry their constraints as options (`[(validate.rules).string
= {min_len: 1}]`, a oneof that is `(validate.required)`); Envoy checks them
when it loads a bootstrap, recursing into every `typed_config`. protobuf's
json_format does not, so this module walks a message and its descriptor and
checks them, the first failure being a ConfigError at its field path, with
PGV's wording ("value length must be at least 1 characters").

The rules follow PGV's semantics: a singular message or wrapper is checked
only when set (but for `required`); a plain proto3 scalar always (its
default too), unless `ignore_empty` and empty; a oneof member only if it is
the one set; `lt`/`gt` together mean a range, or its outside when gt > lt.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import re2
from google.protobuf import message

from ..values import ConfigError
from . import schema

WRAPPERS = {f"google.protobuf.{n}Value" for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool",
                                                  "String", "Bytes")}
NUMERIC = ("float", "double", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32", "fixed64",
           "sfixed32", "sfixed64")

def _extensions() -> tuple[Any, Any, Any, Any]:
    """validate.rules, validate.required (oneof), validate.disabled and validate.ignored (message)."""
    from validate import validate_pb2  # with the other generated modules: only when a bootstrap is read
    return validate_pb2.rules, validate_pb2.required, validate_pb2.disabled, validate_pb2.ignored


def check(msg: message.Message, where: str = "") -> None:
    """Every PGV rule of `msg` and what it contains; raises ConfigError at the first broken one."""
    rules, required, disabled, ignored = _extensions()
    _message(msg, where, rules, required, disabled, ignored)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _message(msg: message.Message, where: str, rules_ext: Any, required: Any, disabled: Any, ignored: Any) -> None:
    desc = msg.DESCRIPTOR
    options = desc.GetOptions()
    if options.Extensions[disabled] or options.Extensions[ignored]:
        return
    if desc.full_name == "google.protobuf.Duration":  # Envoy checks every duration, whatever its rules
        _envoy_duration(msg, where)
        return
    if desc.full_name == "google.protobuf.Any":
        if msg.type_url:  # type: ignore[attr-defined]
            inner = schema.unpack(msg, where)  # type: ignore[arg-type]
            _message(inner, where, rules_ext, required, disabled, ignored)
        return
    for oneof in desc.oneofs:
        if oneof.GetOptions().Extensions[required] and msg.WhichOneof(oneof.name) is None:
            names = ", ".join(f.name for f in oneof.fields)
            raise ConfigError(_join(where, oneof.name), f"value is required (one of {names})")
    for field in desc.fields:
        path = _join(where, field.name)
        if field.containing_oneof is not None and msg.WhichOneof(field.containing_oneof.name) != field.name:
            continue
        opts = field.GetOptions()
        rules = opts.Extensions[rules_ext] if opts.HasExtension(rules_ext) else None
        value = getattr(msg, field.name)
        if schema._is_map(field):
            _map(value, path, rules, field, rules_ext, required, disabled, ignored)
        elif field.is_repeated:
            _repeated(list(value), path, rules, field, rules_ext, required, disabled, ignored)
        elif field.message_type is not None:
            present = msg.HasField(field.name)
            _singular_message(value, present, path, rules, rules_ext, required, disabled, ignored)
        else:
            if field.has_presence and not msg.HasField(field.name):
                continue
            if rules is not None:
                _scalar(value, path, rules, field)


def _singular_message(value: message.Message, present: bool, path: str, rules: Any, *exts: Any) -> None:
    type_name = value.DESCRIPTOR.full_name
    if rules is not None:
        kind = rules.WhichOneof("type")
        if not present:
            if (rules.HasField("message") and rules.message.required) or (
                    kind in ("duration", "any", "timestamp") and getattr(rules, kind).required):
                raise ConfigError(path, "value is required")
            return
        if rules.HasField("message") and rules.message.skip:
            return
        if type_name in WRAPPERS and kind is not None:
            _scalar(value.value, path, rules, None)  # type: ignore[attr-defined]
        elif kind == "duration":
            _duration(value, path, rules.duration)
        elif kind == "any":
            _any(value, path, rules.any)
    if present and type_name not in WRAPPERS:
        _message(value, path, *exts)


def _repeated(values: list[Any], path: str, rules: Any, field: Any, *exts: Any) -> None:
    items_rules = None
    if rules is not None and rules.WhichOneof("type") == "repeated":
        r = rules.repeated
        if not (r.ignore_empty and not values):
            _count(len(values), path, r, "items")
            if r.unique and len({_hashable(v) for v in values}) != len(values):
                raise ConfigError(path, "repeated value must contain unique items")
        if r.HasField("items"):
            items_rules = r.items
    for i, value in enumerate(values):
        item = f"{path}[{i}]"
        if isinstance(value, message.Message):
            _singular_message(value, True, item, items_rules, *exts)
        elif items_rules is not None:
            _scalar(value, item, items_rules, field)


def _map(value: Any, path: str, rules: Any, field: Any, *exts: Any) -> None:
    entries = dict(value)
    key_rules = value_rules = None
    if rules is not None and rules.WhichOneof("type") == "map":
        r = rules.map
        if not (r.ignore_empty and not entries):
            _count(len(entries), path, r, "pairs")
        key_rules = r.keys if r.HasField("keys") else None
        value_rules = r.values if r.HasField("values") else None
    value_field = field.message_type.fields_by_name["value"]
    key_field = field.message_type.fields_by_name["key"]
    for key, item in entries.items():
        item_path = f"{path}[{key!r}]"
        if key_rules is not None:
            _scalar(key, item_path, key_rules, key_field)
        if isinstance(item, message.Message):
            _singular_message(item, True, item_path, value_rules, *exts)
        elif value_rules is not None:
            _scalar(item, item_path, value_rules, value_field)


def _count(count: int, path: str, r: Any, unit: str) -> None:
    """min_items/max_items (unit "items") or min_pairs/max_pairs ("pairs")."""
    low, high = f"min_{unit}", f"max_{unit}"
    if r.HasField(low) and count < getattr(r, low):
        raise ConfigError(path, f"value must contain at least {getattr(r, low)} {unit[:-1]}(s)")
    if r.HasField(high) and count > getattr(r, high):
        raise ConfigError(path, f"value must contain no more than {getattr(r, high)} {unit[:-1]}(s)")


def _hashable(value: Any) -> Any:
    return value.SerializeToString(deterministic=True) if isinstance(value, message.Message) else value


# --- scalars --------------------------------------------------------------------------------

def _scalar(value: Any, path: str, rules: Any, field: Any) -> None:
    kind = rules.WhichOneof("type")
    if kind is None:
        return
    r = getattr(rules, kind)
    if kind in NUMERIC:
        _number(value, path, r)
    elif kind == "string":
        _string(value, path, r)
    elif kind == "bytes":
        _bytes(value, path, r)
    elif kind == "bool":
        if r.HasField("const") and value != r.const:
            raise ConfigError(path, f"value must equal {str(r.const).lower()}")
    elif kind == "enum":
        _enum(value, path, r, field)


def _range(value: Any, path: str, r: Any, show: Callable[[Any], str] = str) -> None:
    """const, in, not_in, lt, lte, gt, gte as PGV reads them, for numbers and durations alike."""
    if r.HasField("const") and value != r.const:
        raise ConfigError(path, f"value must equal {show(r.const)}")
    allowed = list(getattr(r, "in"))
    if allowed and value not in allowed:
        raise ConfigError(path, f"value must be in list {[show(v) for v in allowed]}")
    if value in list(r.not_in):
        raise ConfigError(path, f"value must not be in list {[show(v) for v in r.not_in]}")
    upper = ("lt", r.lt) if r.HasField("lt") else ("lte", r.lte) if r.HasField("lte") else None
    lower = ("gt", r.gt) if r.HasField("gt") else ("gte", r.gte) if r.HasField("gte") else None
    above = lower is None or (value > lower[1] if lower[0] == "gt" else value >= lower[1])
    below = upper is None or (value < upper[1] if upper[0] == "lt" else value <= upper[1])
    if upper is not None and lower is not None:
        opening, closing = "(" if lower[0] == "gt" else "[", ")" if upper[0] == "lt" else "]"
        if lower[1] < upper[1]:
            if not (above and below):
                raise ConfigError(path, f"value must be inside range {opening}{show(lower[1])}, {show(upper[1])}"
                                        f"{closing}")
        elif not (above or below):  # gt above lt: PGV's exclusive range, the values outside
            raise ConfigError(path, f"value must be outside range {show(upper[1])}, {show(lower[1])}")
        return
    if not above and lower is not None:
        word = "greater than" if lower[0] == "gt" else "greater than or equal to"
        raise ConfigError(path, f"value must be {word} {show(lower[1])}")
    if not below and upper is not None:
        word = "less than" if upper[0] == "lt" else "less than or equal to"
        raise ConfigError(path, f"value must be {word} {show(upper[1])}")


def _number(value: Any, path: str, r: Any) -> None:
    if getattr(r, "ignore_empty", False) and not value:
        return
    _range(value, path, r)


def _enum(value: int, path: str, r: Any, field: Any) -> None:
    if r.HasField("const") and value != r.const:
        raise ConfigError(path, f"value must equal {r.const}")
    if r.defined_only and field is not None and field.enum_type is not None \
            and value not in field.enum_type.values_by_number:
        raise ConfigError(path, "value must be one of the defined enum values")
    if len(getattr(r, "in")) and value not in list(getattr(r, "in")):
        raise ConfigError(path, f"value must be in list {list(getattr(r, 'in'))}")
    if value in list(r.not_in):
        raise ConfigError(path, f"value must not be in list {list(r.not_in)}")


def _duration(value: Any, path: str, r: Any) -> None:
    def nanos(d: Any) -> int:
        return int(d.seconds) * 1_000_000_000 + int(d.nanos)

    def show(n: int) -> str:
        return f"{n / 1e9:g}s"

    class _Nanos:  # the rules' durations as nanoseconds, so _range can compare them
        def __init__(self) -> None:
            self.values = {name: nanos(getattr(r, name)) for name in ("const", "lt", "lte", "gt", "gte")
                           if r.HasField(name)}
            setattr(self, "in", [nanos(d) for d in getattr(r, "in")])
            self.not_in = [nanos(d) for d in r.not_in]

        def HasField(self, name: str) -> bool:
            return name in self.values

        def __getattr__(self, name: str) -> int:
            return self.values[name]

    _range(nanos(value), path, _Nanos(), show)


MAX_DURATION_SECONDS = 315_576_000_000  # protobuf's bound for a Duration, which Envoy enforces


def _envoy_duration(value: Any, path: str) -> None:
    """Envoy's own check of every Duration in a configuration (MessageUtil::validateDurationFields)."""
    if value.seconds < 0 or value.nanos < 0:
        raise ConfigError(path, "Invalid duration: Expected positive duration")
    if value.seconds > MAX_DURATION_SECONDS or value.nanos > 999_999_999:
        raise ConfigError(path, "Invalid duration: Duration out-of-range")


def _any(value: Any, path: str, r: Any) -> None:
    url = value.type_url
    if len(getattr(r, "in")) and url not in list(getattr(r, "in")):
        raise ConfigError(path, f"type URL must be in list {list(getattr(r, 'in'))}")
    if url in list(r.not_in):
        raise ConfigError(path, f"type URL must not be in list {list(r.not_in)}")


# --- strings -----------------------------------------------------------------------------

_HEADER = {  # PGV's well-known regexes (strict, then loose)
    1: (r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$", r"^[^\x00\n\r]*$"),  # HTTP_HEADER_NAME
    2: (r"^[^\x00-\x08\x0A-\x1F\x7F]*$", r"^[^\x00\n\r]*$"),  # HTTP_HEADER_VALUE
}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*\.?$")


def _is_ip(text: str, versions: Sequence[int]) -> bool:
    try:
        return ipaddress.ip_address(text).version in versions
    except ValueError:
        return False


def _string(value: str, path: str, r: Any) -> None:
    if r.ignore_empty and not value:
        return
    runes, size = len(value), len(value.encode())
    checks: list[tuple[bool, str]] = [
        (r.HasField("const") and value != r.const, f"value must equal {r.const!r}"),
        (r.HasField("len") and runes != r.len, f"value length must be {r.len} characters"),
        (r.HasField("min_len") and runes < r.min_len, f"value length must be at least {r.min_len} characters"),
        (r.HasField("max_len") and runes > r.max_len, f"value length must be at most {r.max_len} characters"),
        (r.HasField("len_bytes") and size != r.len_bytes, f"value length must be {r.len_bytes} bytes"),
        (r.HasField("min_bytes") and size < r.min_bytes, f"value length must be at least {r.min_bytes} bytes"),
        (r.HasField("max_bytes") and size > r.max_bytes, f"value length must be at most {r.max_bytes} bytes"),
        (r.HasField("prefix") and not value.startswith(r.prefix), f"value does not have prefix {r.prefix!r}"),
        (r.HasField("suffix") and not value.endswith(r.suffix), f"value does not have suffix {r.suffix!r}"),
        (r.HasField("contains") and r.contains not in value, f"value does not contain substring {r.contains!r}"),
        (r.HasField("not_contains") and r.not_contains in value,
         f"value contains substring {r.not_contains!r}"),
        (bool(len(getattr(r, "in"))) and value not in list(getattr(r, "in")),
         f"value must be in list {list(getattr(r, 'in'))}"),
        (value in list(r.not_in), f"value must not be in list {list(r.not_in)}"),
    ]
    for failed, problem in checks:
        if failed:
            raise ConfigError(path, problem)
    if r.HasField("pattern") and not re2.search(r.pattern, value):
        raise ConfigError(path, f"value does not match regex pattern {r.pattern!r}")
    known = r.WhichOneof("well_known")
    if known is None or not getattr(r, known):
        return
    if not _well_known(known, value, r):
        raise ConfigError(path, f"value must be a valid {known.replace('_', ' ')}")


def _well_known(known: str, value: str, r: Any) -> bool:
    """PGV's well-known string formats."""
    if known in ("ip", "ipv4", "ipv6"):
        return _is_ip(value, {"ip": (4, 6), "ipv4": (4,), "ipv6": (6,)}[known])
    if known == "hostname":
        return bool(_HOSTNAME.match(value))
    if known == "address":
        return _is_ip(value, (4, 6)) or bool(_HOSTNAME.match(value))
    if known == "email":
        return "@" in value and bool(_HOSTNAME.match(value.rpartition("@")[2]))
    if known == "uri":
        return bool(urlparse(value).scheme)
    if known == "uuid":
        return _is_uuid(value)
    if known == "well_known_regex":
        return _header(value, r.well_known_regex, r.strict if r.HasField("strict") else True)
    return True  # uri_ref and anything newer: PGV's checks there are lenient too


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _header(value: str, which: int, strict: bool) -> bool:
    if which not in _HEADER:
        return True
    return bool(re.match(_HEADER[which][0 if strict else 1], value))


def _bytes(value: bytes, path: str, r: Any) -> None:
    if r.ignore_empty and not value:
        return
    size = len(value)
    if r.HasField("len") and size != r.len:
        raise ConfigError(path, f"value length must be {r.len} bytes")
    if r.HasField("min_len") and size < r.min_len:
        raise ConfigError(path, f"value length must be at least {r.min_len} bytes")
    if r.HasField("max_len") and size > r.max_len:
        raise ConfigError(path, f"value length must be at most {r.max_len} bytes")

