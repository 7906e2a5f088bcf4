"""One small metadata filter language that every store translates to its database.

Build filters with :class:`Field` and the operators ``== != < <= > >= & | ~``::

    (Field("lang") == "ko") & (Field("year") >= 2020) & Field("tag").isin(["a", "b"])

or as a MongoDB-style dict (the form LangChain users know)::

    {"lang": "ko", "year": {"$gte": 2020}, "tag": {"$in": ["a", "b"]}}

Semantics (every adapter must give the same answers as :func:`matches`):

- keys are top-level metadata keys; values are ``str``, ``int``, ``float`` or ``bool``;
- a stored list value (tags) satisfies a condition when any of its elements does;
- a condition on a key the document lacks is false; ``Not`` of it is true;
- ``bool`` never equals a number (``True != 1``); ``1 == 1.0``;
- ranges compare numbers only.

A :class:`RawFilter` carries a database's own filter object past the translation unchanged,
as an escape hatch; only the store it was written for accepts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Scalar = str | int | float | bool


class FilterError(ValueError):
    """A filter that is malformed or uses what the language does not have."""


class _Combinable:
    def __and__(self, other: Filter) -> And:
        return And((_as_node(self), _as_node(other)))

    def __or__(self, other: Filter) -> Or:
        return Or((_as_node(self), _as_node(other)))

    def __invert__(self) -> Not:
        return Not(_as_node(self))


@dataclass(frozen=True)
class Eq(_Combinable):
    key: str
    value: Scalar


@dataclass(frozen=True)
class In(_Combinable):
    key: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Range(_Combinable):
    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class And(_Combinable):
    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class Or(_Combinable):
    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class Not(_Combinable):
    filter: Filter


Filter = Eq | In | Range | And | Or | Not


@dataclass(frozen=True)
class RawFilter:
    """A database's own filter (a Qdrant ``Filter``, a Milvus expression string, an
    Elasticsearch query dict), passed to that database unchanged."""

    value: Any


FilterLike = Filter | RawFilter | Mapping[str, Any] | None


class Field:
    """``Field("year") >= 2020`` builds filter nodes for one metadata key."""

    def __init__(self, key: str) -> None:
        self.key = _check_key(key)

    def __eq__(self, value: object) -> Eq:  # type: ignore[override]
        return Eq(self.key, _check_scalar(value, self.key))

    def __ne__(self, value: object) -> Not:  # type: ignore[override]
        return Not(Eq(self.key, _check_scalar(value, self.key)))

    def __gt__(self, value: float) -> Range:
        return Range(self.key, gt=_check_number(value, self.key))

    def __ge__(self, value: float) -> Range:
        return Range(self.key, gte=_check_number(value, self.key))

    def __lt__(self, value: float) -> Range:
        return Range(self.key, lt=_check_number(value, self.key))

    def __le__(self, value: float) -> Range:
        return Range(self.key, lte=_check_number(value, self.key))

    def isin(self, values: Sequence[Scalar]) -> In:
        return In(self.key, _check_values(values, self.key))

    def between(self, low: float, high: float) -> Range:
        """``low <= value <= high``."""
        return Range(self.key, gte=_check_number(low, self.key), lte=_check_number(high, self.key))

    __hash__ = None  # type: ignore[assignment]


def parse_filter(spec: FilterLike) -> Filter | RawFilter | None:
    """Normalize what a user passes as ``filter=`` into a filter tree (validated)."""
    if spec is None or isinstance(spec, RawFilter):
        return spec
    if isinstance(spec, (Eq, In, Range, And, Or, Not)):
        _validate(spec)
        return spec
    if isinstance(spec, Mapping):
        if not spec:
            return None
        return _parse_mapping(spec)
    raise FilterError(
        f"a filter must be a Field expression, a dict like {{'lang': 'en'}}, or RawFilter(...); "
        f"got {type(spec).__name__}"
    )


_RANGE_OPS = {"$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}


def _parse_mapping(spec: Mapping[str, Any]) -> Filter:
    nodes: list[Filter] = []
    for key, value in spec.items():
        if key in ("$and", "$or"):
            if not isinstance(value, Sequence) or isinstance(value, str) or not value:
                raise FilterError(f"{key} takes a non-empty list of filters, got {value!r}")
            children = tuple(_parse_mapping(_mapping(child, key)) for child in value)
            nodes.append(And(children) if key == "$and" else Or(children))
        elif key == "$not":
            nodes.append(Not(_parse_mapping(_mapping(value, key))))
        elif key.startswith("$"):
            raise FilterError(f"unknown filter operator {key!r} at the top level")
        else:
            nodes.append(_parse_condition(_check_key(key), value))
    return nodes[0] if len(nodes) == 1 else And(tuple(nodes))


def _parse_condition(key: str, value: Any) -> Filter:
    if not isinstance(value, Mapping):
        return Eq(key, _check_scalar(value, key))
    nodes: list[Filter] = []
    bounds: dict[str, float] = {}
    for op, operand in value.items():
        if op == "$eq":
            nodes.append(Eq(key, _check_scalar(operand, key)))
        elif op == "$ne":
            nodes.append(Not(Eq(key, _check_scalar(operand, key))))
        elif op == "$in":
            nodes.append(In(key, _check_values(operand, key)))
        elif op == "$nin":
            nodes.append(Not(In(key, _check_values(operand, key))))
        elif op in _RANGE_OPS:
            bounds[_RANGE_OPS[op]] = _check_number(operand, key)
        else:
            raise FilterError(
                f"unknown operator {op!r} for key {key!r}; "
                "use $eq, $ne, $in, $nin, $gt, $gte, $lt, $lte"
            )
    if bounds:
        nodes.append(Range(key, **bounds))
    if not nodes:
        raise FilterError(f"empty condition for key {key!r}")
    return nodes[0] if len(nodes) == 1 else And(tuple(nodes))


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not value:
        raise FilterError(f"{where} takes filter dicts, got {value!r}")
    return value


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise FilterError(f"a filter key must be a non-empty string, got {key!r}")
    return key


def _check_scalar(value: Any, key: str) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"filter value for {key!r} must be finite, got {value!r}")
    if not isinstance(value, (str, int, float, bool)):
        raise FilterError(
            f"filter value for {key!r} must be a str, int, float or bool, got {type(value).__name__}"
        )
    return value


def _check_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterError(f"a range on {key!r} needs a number, got {value!r}")
    if not math.isfinite(value):
        raise FilterError(f"a range bound on {key!r} must be finite, got {value!r}")
    return value


def _check_values(values: Any, key: str) -> tuple[Scalar, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise FilterError(f"$in / isin for {key!r} takes a non-empty list, got {values!r}")
    return tuple(_check_scalar(v, key) for v in values)


def _validate(node: Filter) -> None:
    if isinstance(node, Eq):
        _check_key(node.key)
        _check_scalar(node.value, node.key)
    elif isinstance(node, In):
        _check_key(node.key)
        _check_values(node.values, node.key)
    elif isinstance(node, Range):
        _check_key(node.key)
        bounds = [b for b in (node.gt, node.gte, node.lt, node.lte) if b is not None]
        if not bounds:
            raise FilterError(f"a range on {node.key!r} needs at least one bound")
        for b in bounds:
            _check_number(b, node.key)
    elif isinstance(node, (And, Or)):
        if not node.filters:
            raise FilterError(f"{type(node).__name__} needs at least one filter")
        for child in node.filters:
            _validate(child)
    elif isinstance(node, Not):
        _validate(node.filter)
    else:
        raise FilterError(f"not a filter node: {node!r}")


def _as_node(value: Any) -> Filter:
    if isinstance(value, (Eq, In, Range, And, Or, Not)):
        return value
    raise FilterError(f"cannot combine a filter with {value!r}")


def _same_value(stored: Any, wanted: Scalar) -> bool:
    # bool is an int subclass in Python; databases keep them apart, so do we.
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return isinstance(stored, bool) and isinstance(wanted, bool) and stored == wanted
    if isinstance(wanted, str) or isinstance(stored, str):
        return isinstance(stored, str) and isinstance(wanted, str) and stored == wanted
    return isinstance(stored, (int, float)) and stored == wanted


def _values_of(metadata: Mapping[str, Any], key: str) -> list[Any]:
    """The stored values a condition is tested against: a list's elements, else the value."""
    if key not in metadata:
        return []
    value = metadata[key]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _in_range(node: Range, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (
        (node.gt is None or value > node.gt)
        and (node.gte is None or value >= node.gte)
        and (node.lt is None or value < node.lt)
        and (node.lte is None or value <= node.lte)
    )


def matches(node: Filter | None, metadata: Mapping[str, Any]) -> bool:
    """Whether a document's metadata satisfies the filter: the reference semantics."""
    if node is None:
        return True
    if isinstance(node, Eq):
        return any(_same_value(v, node.value) for v in _values_of(metadata, node.key))
    if isinstance(node, In):
        return any(
            _same_value(v, wanted) for v in _values_of(metadata, node.key) for wanted in node.values
        )
    if isinstance(node, Range):
        return any(_in_range(node, v) for v in _values_of(metadata, node.key))
    if isinstance(node, And):
        return all(matches(child, metadata) for child in node.filters)
    if isinstance(node, Or):
        return any(matches(child, metadata) for child in node.filters)
    if isinstance(node, Not):
        return not matches(node.filter, metadata)
    raise FilterError(f"not a filter node: {node!r}")
