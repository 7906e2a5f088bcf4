"""A fake Elasticsearch node: the real ``elasticsearch`` client talks to it through
``elastic_transport``'s node interface (``node_class=``), so every request goes through the
client's own serialization, headers and error handling.

It answers like Elasticsearch 8.18-9.x for what m3connect uses, computing answers from the
documents it holds, and it CHECKS every request: a request Elasticsearch would reject gets
Elasticsearch's error, and a request that is well-formed for Elasticsearch but outside what
the adapter should send (query pruning left on, ``rescore_vector`` on a float index, an unknown
body key, ...) is recorded in ``FakeElasticsearch.violations`` (tests assert it stays empty) and
answered with a 400.

What it computes:

- kNN (``dot_product``): ``(1 + dot) / 2`` in float32 over the filtered documents, exact; on a
  quantized index (``int8_hnsw`` ...) without ``rescore_vector`` the documents' int8 copies are
  used, as the HNSW graph would;
- ``sparse_vector``: ``sum w_q * w_d`` in float32 with each stored weight kept to 9 significant
  bits, as Lucene's ``FeatureField`` stores it (``bits & ~0x7FFF``);
- ``script_score`` with ``dotProduct`` / ``maxSimDotProduct`` (a SUM of max dots) ``+ params.x``;
- the ``rrf`` retriever (``1 / (rank_constant + rank)``, ranks from 1) and ``linear``;
- licences: ``rank_vectors`` and the ``rrf`` / ``linear`` retrievers answer 403 unless the
  licence is an active enterprise or trial one;
- dynamic metadata mapping through the index's dynamic templates, with Elasticsearch's
  coercion and per-document ``mapper_parsing_exception`` for values that do not fit.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
from elastic_transport import ApiResponseMeta, BaseAsyncNode, BaseNode, HttpHeaders
from elastic_transport._node import NodeApiResponse
from elasticsearch import AsyncElasticsearch, Elasticsearch

KNOWN_INDEX_TYPES = {
    "hnsw",
    "flat",
    "int8_hnsw",
    "int4_hnsw",
    "bbq_hnsw",
    "int8_flat",
    "int4_flat",
    "bbq_flat",
    "bbq_disk",
}
QUANTIZED = KNOWN_INDEX_TYPES - {"hnsw", "flat"}
NUMERIC = {"double", "long", "integer", "float"}
SCRIPT_RE = re.compile(
    r"^\s*(maxSimDotProduct|dotProduct)\(params\.(\w+), '([\w.]+)'\)(?:\s*\+\s*params\.(\w+))?\s*$"
)


class EsError(Exception):
    """An error answer, shaped like Elasticsearch's."""

    def __init__(self, status: int, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error_type, self.reason = status, error_type, reason

    def body(self) -> dict[str, Any]:
        cause = {"type": self.error_type, "reason": self.reason}
        return {"error": {"root_cause": [cause], **cause}, "status": self.status}


class Violation(EsError):
    """A request m3connect should not send."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, "fake_violation", reason)


def check(condition: Any, reason: str) -> None:
    if not condition:
        raise Violation(reason)


def keys_within(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    check(isinstance(obj, dict), f"{where} must be an object, got {obj!r}")
    unknown = set(obj) - allowed
    check(not unknown, f"{where} has unknown keys {sorted(unknown)}")


def licence_error(feature: str) -> EsError:
    return EsError(403, "security_exception", f"current license is non-compliant for [{feature}]")


def quantize_feature(weight: float) -> np.float32:
    """Lucene FeatureField keeps 9 significant bits of a feature value (truncated)."""
    bits = np.array([weight], dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF8000)
    return bits.view(np.float32)[0]


def int8_copy(vector: np.ndarray) -> np.ndarray:
    scale = float(np.abs(vector).max()) / 127 or 1.0
    return (np.round(vector / scale) * scale).astype(np.float32)


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class Doc:
    """A stored document: its ``_source`` and what is indexed from it."""

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source
        # Indexed values by field path: keyword, double, boolean and text values.
        self.fields: dict[str, list[Any]] = {}
        # dense_vector -> float32 [d], sparse_vector -> {token: 9-bit float32}, rank_vectors -> [n, d]
        self.vectors: dict[str, Any] = {}


class Index:
    def __init__(
        self, name: str, mappings: dict[str, Any], settings: dict[str, Any], exclude_vectors: bool
    ) -> None:
        self.name, self.mappings, self.settings = name, mappings, settings
        self.exclude_vectors = exclude_vectors
        self.docs: dict[str, Doc] = {}

    def field(self, path: str) -> dict[str, Any] | None:
        props = self.mappings.get("properties", {})
        spec = None
        for part in path.split("."):
            spec = props.get(part)
            if spec is None:
                return None
            props = spec.get("properties", {})
        return spec


class FakeElasticsearch:
    """One fake cluster. ``licence`` is the ``GET _license`` type (``basic``, ``trial``,
    ``enterprise``, ``platinum``), ``status`` its status; ``version`` the server version."""

    def __init__(
        self, licence: str = "basic", *, version: str = "9.2.0", status: str = "active"
    ) -> None:
        self.licence, self.status, self.version_text = licence, status, version
        major, minor = (int(x) for x in version.split(".")[:2])
        self.version = (major, minor)
        self.licence_readable = True
        self.indices: dict[str, Index] = {}
        self.requests: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self._scrolls: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._scroll_ids = itertools.count(1)

    @property
    def enterprise(self) -> bool:
        return self.licence in ("enterprise", "trial") and self.status == "active"

    # --- clients --------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Elasticsearch:
        cluster = self

        class Node(BaseNode):
            def perform_request(
                self, method, target, body=None, headers=None, request_timeout=None
            ):  # type: ignore[no-untyped-def]
                return cluster._respond(
                    self.config, method, target, body, {**self.headers, **(headers or {})}
                )

        return Elasticsearch(kwargs.pop("hosts", "http://es.test:9200"), node_class=Node, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncElasticsearch:
        cluster = self

        class AsyncNode(BaseAsyncNode):
            async def perform_request(
                self, method, target, body=None, headers=None, request_timeout=None
            ):  # type: ignore[no-untyped-def]
                return cluster._respond(
                    self.config, method, target, body, {**self.headers, **(headers or {})}
                )

            async def close(self) -> None:
                pass

        return AsyncElasticsearch(
            kwargs.pop("hosts", "http://es.test:9200"), node_class=AsyncNode, **kwargs
        )

    def _respond(
        self, config: Any, method: str, target: str, body: bytes | None, headers: Any
    ) -> NodeApiResponse:
        try:
            status, answer = self.handle(method, target, body, dict(headers or {}))
        except EsError as exc:
            if isinstance(exc, Violation):
                self.violations.append(f"{method} {target}: {exc.reason}")
            status, answer = exc.status, exc.body()
        meta = ApiResponseMeta(
            status=status,
            http_version="1.1",
            headers=HttpHeaders(
                {"x-elastic-product": "Elasticsearch", "content-type": "application/json"}
            ),
            duration=0.0,
            node=config,
        )
        return NodeApiResponse(meta, b"" if answer is None else json.dumps(answer).encode())

    # --- routing --------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, raw: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        url = urlsplit(target)
        path = [unquote(p) for p in url.path.strip("/").split("/") if p]
        params = dict(parse_qsl(url.query))
        lowered = {k.lower(): v for k, v in headers.items()}
        ndjson = path[-1:] == ["_bulk"]
        body: Any = None
        if raw:
            ctype = lowered.get("content-type", "")
            wanted = (
                "application/vnd.elasticsearch+x-ndjson"
                if ndjson
                else "application/vnd.elasticsearch+json"
            )
            check(ctype.startswith(wanted), f"content-type {ctype!r}, expected {wanted}")
            text = raw.decode("utf-8")
            body = (
                [json.loads(line) for line in text.splitlines() if line]
                if ndjson
                else json.loads(text)
            )
        self.requests.append(
            {
                "method": method,
                "path": "/" + "/".join(path),
                "params": params,
                "body": body,
                "headers": lowered,
            }
        )
        route = (method, tuple(p if p.startswith("_") or p == "scroll" else "{}" for p in path))
        handlers: dict[tuple[str, tuple[str, ...]], Callable[..., tuple[int, Any]]] = {
            ("GET", ()): lambda: (200, self._info()),
            ("GET", ("_license",)): self._license,
            ("HEAD", ("{}",)): lambda: (200 if path[0] in self.indices else 404, None),
            ("PUT", ("{}",)): lambda: self._create(path[0], body or {}),
            ("GET", ("{}",)): lambda: self._get_index(path[0]),
            ("DELETE", ("{}",)): lambda: self._delete_index(path[0]),
            ("GET", ("{}", "_mapping")): lambda: (
                200,
                {path[0]: {"mappings": self._index(path[0]).mappings}},
            ),
            ("PUT", ("{}", "_bulk")): lambda: self._bulk(path[0], body or [], params),
            ("POST", ("{}", "_bulk")): lambda: self._bulk(path[0], body or [], params),
            ("POST", ("_bulk",)): lambda: self._bulk(None, body or [], params),
            ("PUT", ("_bulk",)): lambda: self._bulk(None, body or [], params),
            ("POST", ("{}", "_search")): lambda: self._search(path[0], body or {}, params),
            ("POST", ("_search", "scroll")): lambda: self._scroll(body or {}),
            ("DELETE", ("_search", "scroll")): lambda: self._clear_scroll(body or {}),
            ("POST", ("{}", "_count")): lambda: self._count(path[0], body or {}),
            ("POST", ("{}", "_delete_by_query")): lambda: self._delete_by_query(
                path[0], body or {}, params
            ),
            ("POST", ("{}", "_refresh")): lambda: (200, {"_shards": {"failed": 0}}),
        }
        handler = handlers.get(route)
        check(handler is not None, f"the fake does not serve {method} {target}")
        return handler()  # type: ignore[misc]

    def _info(self) -> dict[str, Any]:
        return {
            "name": "fake-node",
            "cluster_name": "fake",
            "version": {
                "number": self.version_text,
                "build_flavor": "default",
                "lucene_version": "10.0.0",
            },
            "tagline": "You Know, for Search",
        }

    def _license(self) -> tuple[int, Any]:
        if not self.licence_readable:
            raise EsError(
                403,
                "security_exception",
                "action [cluster:monitor/xpack/license/get] is unauthorized",
            )
        return 200, {
            "license": {
                "status": self.status,
                "uid": "fake",
                "type": self.licence,
                "issued_to": "fake",
            }
        }

    def _index(self, name: str) -> Index:
        if name not in self.indices:
            raise EsError(404, "index_not_found_exception", f"no such index [{name}]")
        return self.indices[name]

    # --- indices --------------------------------------------------------------------------

    def _create(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        keys_within(body, {"mappings", "settings"}, "create index body")
        if name in self.indices:
            raise EsError(
                400, "resource_already_exists_exception", f"index [{name}] already exists"
            )
        settings = dict(body.get("settings") or {})
        exclude = self.version >= (9, 2)
        if "index.mapping.exclude_source_vectors" in settings:
            if self.version < (9, 2):
                raise EsError(
                    400,
                    "illegal_argument_exception",
                    "unknown setting [index.mapping.exclude_source_vectors]",
                )
            exclude = settings["index.mapping.exclude_source_vectors"] not in (False, "false")
        for key in settings:
            check(
                key.startswith("index.") or key in ("number_of_shards", "number_of_replicas"),
                f"unexpected setting {key}",
            )
        mappings = json.loads(json.dumps(body.get("mappings") or {}))
        self._check_mappings(mappings)
        self.indices[name] = Index(name, mappings, settings, exclude)
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _check_mappings(self, mappings: dict[str, Any]) -> None:
        keys_within(mappings, {"dynamic", "_meta", "dynamic_templates", "properties"}, "mappings")
        for template in mappings.get("dynamic_templates", []):
            (spec,) = template.values()
            keys_within(spec, {"path_match", "match_mapping_type", "mapping"}, "dynamic template")
            check(
                spec["match_mapping_type"] in ("string", "long", "double", "boolean", "object"),
                "match_mapping_type",
            )
        self._check_properties(mappings.get("properties") or {}, "")

    def _check_properties(self, props: dict[str, Any], prefix: str) -> None:
        for name, spec in props.items():
            where = f"field [{prefix}{name}]"
            kind = spec.get("type", "object")
            if kind == "dense_vector":
                keys_within(
                    spec,
                    {"type", "dims", "index", "similarity", "index_options", "element_type"},
                    where,
                )
                check(
                    isinstance(spec.get("dims"), int) and 1 <= spec["dims"] <= 4096, f"{where} dims"
                )
                check(
                    spec.get("similarity")
                    in ("dot_product", "cosine", "l2_norm", "max_inner_product"),
                    f"{where} similarity",
                )
                options = spec.get("index_options") or {}
                check(
                    options.get("type") in KNOWN_INDEX_TYPES,
                    f"{where} index_options type {options.get('type')!r}",
                )
                keys_within(
                    options,
                    {"type", "m", "ef_construction", "confidence_interval", "rescore_vector"},
                    f"{where} index_options",
                )
            elif kind == "sparse_vector":
                keys_within(spec, {"type", "index_options", "store"}, where)
                if "index_options" in spec:
                    supported = self.version >= (9, 1) or (8, 19) <= self.version < (9, 0)
                    if not supported:
                        raise EsError(
                            400,
                            "mapper_parsing_exception",
                            f"unknown parameter [index_options] on {where}",
                        )
                    keys_within(
                        spec["index_options"], {"prune", "pruning_config"}, f"{where} index_options"
                    )
            elif kind == "rank_vectors":
                if not self.enterprise:
                    raise licence_error("Rank Vectors")
                keys_within(spec, {"type", "dims", "element_type"}, where)
                check(
                    spec.get("element_type", "float") in ("float", "byte", "bit"),
                    f"{where} element_type",
                )
            elif kind == "object":
                keys_within(spec, {"type", "dynamic", "enabled", "properties"}, where)
                self._check_properties(spec.get("properties") or {}, f"{prefix}{name}.")
            else:
                check(
                    kind in {"keyword", "text", "binary", "boolean", *NUMERIC},
                    f"{where} type {kind}",
                )

    def _get_index(self, name: str) -> tuple[int, Any]:
        index = self._index(name)
        return 200, {
            name: {
                "aliases": {},
                "mappings": index.mappings,
                "settings": {"index": dict(index.settings)},
            }
        }

    def _delete_index(self, name: str) -> tuple[int, Any]:
        self._index(name)
        del self.indices[name]
        return 200, {"acknowledged": True}

    # --- documents ------------------------------------------------------------------------

    def _bulk(
        self, path_index: str | None, lines: list[dict[str, Any]], params: dict[str, str]
    ) -> tuple[int, Any]:
        check(
            params.get("refresh", "false") in ("true", "false", "wait_for"),
            f"refresh={params.get('refresh')}",
        )
        items, i = [], 0
        while i < len(lines):
            ((op, action),) = lines[i].items()
            check(op in ("index", "delete"), f"bulk op {op}")
            check("_id" in action, "bulk action without _id")
            name = action.get("_index", path_index)
            check(name is not None, "bulk action without an index")
            result = {"_index": name, "_id": action["_id"]}
            try:
                index = self._index(name)
                if op == "index":
                    i += 1
                    doc = self._parse_document(index, lines[i])
                    index.docs.pop(action["_id"], None)  # Lucene: delete + add
                    index.docs[action["_id"]] = doc
                    result.update(status=201, result="created")
                elif index.docs.pop(action["_id"], None) is None:
                    result.update(status=404, result="not_found")
                else:
                    result.update(status=200, result="deleted")
            except Violation:
                raise
            except EsError as exc:
                result.update(
                    status=exc.status, error={"type": exc.error_type, "reason": exc.reason}
                )
            items.append({op: result})
            i += 1
        errors = any(
            item[op]["status"] >= 300 and item[op].get("result") != "not_found"
            for item in items
            for op in item
        )
        return 200, {"took": 1, "errors": errors, "items": items}

    def _parse_document(self, index: Index, source: dict[str, Any]) -> Doc:
        doc = Doc(json.loads(json.dumps(source)))
        before = json.loads(json.dumps(index.mappings))  # a refused document changes no mapping
        props = index.mappings.setdefault("properties", {})
        try:
            for name, value in source.items():
                spec = props.get(name)
                if spec is None:
                    if index.mappings.get("dynamic") == "strict":
                        raise EsError(
                            400,
                            "strict_dynamic_mapping_exception",
                            f"mapping set to strict, dynamic introduction of [{name}] within [_doc] is not allowed",
                        )
                    continue
                self._index_value(index, doc, name, spec, value)
        except EsError:
            index.mappings = before
            raise
        if index.exclude_vectors:
            for name, spec in props.items():
                if spec.get("type") in ("dense_vector", "sparse_vector", "rank_vectors"):
                    doc.source.pop(name, None)
        return doc

    def _index_value(
        self, index: Index, doc: Doc, path: str, spec: dict[str, Any], value: Any
    ) -> None:
        kind = spec.get("type", "object")

        def fail(why: str) -> EsError:
            reason = f"failed to parse field [{path}] of type [{kind}]: {why}"
            return EsError(400, "mapper_parsing_exception", reason)

        if value is None:
            return
        if kind == "dense_vector":
            vector = np.asarray(value, dtype=np.float32)
            if vector.shape != (spec["dims"],):
                raise fail(f"the vector has {vector.size} dimensions, the field has {spec['dims']}")
            if spec["similarity"] == "dot_product" and abs(float(vector @ vector) - 1) > 1e-4:
                raise fail(
                    "The [dot_product] similarity can only be used with unit-length vectors."
                )
            doc.vectors[path] = vector
        elif kind == "sparse_vector":
            if not isinstance(value, dict) or not all(
                isinstance(w, (int, float))
                and not isinstance(w, bool)
                and math.isfinite(w)
                and w > 0
                for w in value.values()
            ):
                raise fail(
                    "sparse_vector values must be objects of strictly positive finite numbers"
                )
            doc.vectors[path] = {token: quantize_feature(w) for token, w in value.items()}
        elif kind == "rank_vectors":
            matrix = np.asarray(value, dtype=np.float32)
            if matrix.ndim != 2 or matrix.shape[1] != spec.get("dims", matrix.shape[1]):
                raise fail(
                    f"vectors of shape {matrix.shape}, the field has {spec.get('dims')} dims"
                )
            doc.vectors[path] = matrix
        elif kind == "binary":
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError) as exc:
                raise fail(f"not base64: {exc}") from None
        elif kind == "object":
            if spec.get("enabled") is False:
                return
            for obj in [value] if isinstance(value, dict) else as_list(value):
                if not isinstance(obj, dict):
                    raise fail(f"tried to parse an object but found a concrete value {obj!r}")
                for key, item in obj.items():
                    parts = key.split(".")
                    if not all(parts):
                        raise EsError(
                            400,
                            "illegal_argument_exception",
                            f"field name [{key}] cannot be empty or contain empty parts",
                        )
                    node = spec  # a dotted name is an object path
                    for part in parts[:-1]:
                        node = node.setdefault("properties", {}).setdefault(
                            part, {"properties": {}}
                        )
                    props = node.setdefault("properties", {})
                    sub_path = f"{path}.{key}"
                    if parts[-1] not in props:
                        mapped = self._dynamic(index, sub_path, item)
                        if mapped is None:
                            continue
                        props[parts[-1]] = mapped
                    self._index_value(index, doc, sub_path, props[parts[-1]], item)
        else:
            for item in as_list(value):
                doc.fields.setdefault(path, []).extend(self._coerce(kind, spec, item, fail))

    def _dynamic(self, index: Index, path: str, value: Any) -> dict[str, Any] | None:
        """The mapping Elasticsearch gives a new field, through the dynamic templates."""
        sample = next((v for v in as_list(value) if v is not None), None)
        if sample is None:
            return None
        json_type = (
            "object"
            if isinstance(sample, dict)
            else "boolean"
            if isinstance(sample, bool)
            else "string"
            if isinstance(sample, str)
            else "long"
            if isinstance(sample, int)
            else "double"
        )
        for template in index.mappings.get("dynamic_templates", []):
            (spec,) = template.values()
            pattern = spec["path_match"].replace(".", r"\.").replace("*", ".*")
            if spec["match_mapping_type"] == json_type and re.fullmatch(pattern, path):
                return dict(spec["mapping"])
        return {
            "object": {"properties": {}},
            "boolean": {"type": "boolean"},
            "long": {"type": "long"},
            "double": {"type": "float"},
        }.get(json_type, {"type": "text"})

    @staticmethod
    def _coerce(
        kind: str, spec: dict[str, Any], value: Any, fail: Callable[[str], EsError]
    ) -> list[Any]:
        if isinstance(value, (dict, list)):
            raise fail(f"a {kind} field cannot hold {type(value).__name__}")
        if kind == "keyword":
            text = (
                ("true" if value else "false")
                if isinstance(value, bool)
                else value
                if isinstance(value, str)
                else json.dumps(value)
            )
            return [] if len(text) > spec.get("ignore_above", 1 << 30) else [text]
        if kind == "text":
            return [str(value)]
        if kind == "boolean":
            if isinstance(value, bool):
                return [value]
            if value in ("true", "false"):
                return [value == "true"]
            raise fail(f"Failed to parse value [{value}] as only [true] or [false] are allowed.")
        if kind in NUMERIC:
            if isinstance(value, bool):
                raise fail(f"Current token (VALUE_{str(value).upper()}) not numeric")
            try:
                number = float(value)
            except ValueError:
                raise fail(f'For input string: "{value}"') from None
            return [int(number) if kind in ("long", "integer") else number]
        return []

    # --- queries --------------------------------------------------------------------------

    def _docs(self, index: Index, query: Any) -> dict[str, float]:
        """``{_id: score}`` of the documents matching ``query`` (in index order)."""
        if isinstance(query, list):
            check(all(isinstance(q, dict) for q in query), "a list of queries must hold objects")
            matched = dict.fromkeys(index.docs, 0.0)
            for sub in query:
                sub_docs = self._docs(index, sub)
                matched = {k: s for k, s in matched.items() if k in sub_docs}
            return matched
        check(
            isinstance(query, dict) and len(query) == 1,
            f"a query is an object with one key: {query!r}",
        )
        ((kind, spec),) = query.items()
        if kind == "match_all":
            return dict.fromkeys(index.docs, 1.0)
        if kind == "match_none":
            return {}
        if kind == "ids":
            keys_within(spec, {"values"}, "ids")
            return {k: 1.0 for k in index.docs if k in set(spec["values"])}
        if kind in ("term", "terms", "range"):
            return self._field_query(index, kind, spec)
        if kind == "bool":
            return self._bool(index, spec)
        if kind == "sparse_vector":
            return self._sparse(index, spec)
        if kind == "script_score":
            return self._script_score(index, spec)
        if kind == "match":
            return self._match(index, spec)
        raise Violation(f"the fake does not implement the {kind} query")

    def _field_query(self, index: Index, kind: str, spec: dict[str, Any]) -> dict[str, float]:
        ((path, condition),) = spec.items()
        check(path.startswith("metadata."), f"{kind} on {path}: filters are on metadata.<key>")
        mapped = index.field(path)
        field_type = None if mapped is None else mapped.get("type", "object")
        if kind == "range":
            keys_within(condition, {"gt", "gte", "lt", "lte"}, "range")
            check(
                field_type in NUMERIC or field_type is None, f"range on a {field_type} field {path}"
            )
            for bound in condition.values():
                check(
                    isinstance(bound, (int, float)) and not isinstance(bound, bool),
                    f"range bound {bound!r}",
                )

            def hit(v: Any) -> bool:
                ops = {"gt": v.__gt__, "gte": v.__ge__, "lt": v.__lt__, "lte": v.__le__}
                return all(ops[op](bound) for op, bound in condition.items())
        else:
            values = condition if kind == "terms" else [condition]
            check(isinstance(values, list) and values, f"{kind} values {condition!r}")
            check(
                all(isinstance(v, (str, int, float, bool)) for v in values),
                f"{kind} values must be scalars",
            )
            if field_type in NUMERIC:
                check(
                    not any(isinstance(v, bool) for v in values),
                    f"a boolean term on the numeric field {path}",
                )
                wanted = {float(v) for v in values}
            elif field_type == "boolean":
                check(
                    all(isinstance(v, bool) for v in values),
                    f"a non-boolean term on the boolean field {path}",
                )
                wanted = set(values)
            elif field_type == "keyword":
                check(
                    all(isinstance(v, str) for v in values),
                    f"a non-string term on the keyword field {path}",
                )
                wanted = set(values)
            else:
                check(field_type is None, f"a {kind} query on the {field_type} field {path}")
                wanted = set()

            def hit(v: Any) -> bool:
                return v in wanted

        return {
            k: 1.0 for k, doc in index.docs.items() if any(hit(v) for v in doc.fields.get(path, []))
        }

    def _bool(self, index: Index, spec: dict[str, Any]) -> dict[str, float]:
        keys_within(spec, {"must", "filter", "should", "must_not", "minimum_should_match"}, "bool")
        scores = dict.fromkeys(index.docs, 0.0)
        for clause in as_list(spec.get("must")):
            sub = self._docs(index, clause)
            scores = {k: s + sub[k] for k, s in scores.items() if k in sub}
        for clause in as_list(spec.get("filter")):
            sub = self._docs(index, clause)
            scores = {k: s for k, s in scores.items() if k in sub}
        for clause in as_list(spec.get("must_not")):
            sub = self._docs(index, clause)
            scores = {k: s for k, s in scores.items() if k not in sub}
        should = [self._docs(index, clause) for clause in as_list(spec.get("should"))]
        if should:
            default = 0 if spec.get("must") or spec.get("filter") else 1
            needed = spec.get("minimum_should_match", default)
            scores = {
                k: s + sum(sub.get(k, 0.0) for sub in should)
                for k, s in scores.items()
                if sum(k in sub for sub in should) >= needed
            }
        return scores

    def _sparse(self, index: Index, spec: dict[str, Any]) -> dict[str, float]:
        keys_within(
            spec, {"field", "query_vector", "prune", "pruning_config", "boost"}, "sparse_vector"
        )
        check(
            spec.get("prune") is False,
            "sparse_vector query without prune: false (scores would not be exact)",
        )
        mapped = index.field(spec["field"]) or {}
        check(mapped.get("type") == "sparse_vector", f"sparse_vector query on {spec['field']}")
        query = spec.get("query_vector")
        check(
            isinstance(query, dict) and query,
            "sparse_vector query_vector must be a non-empty object",
        )
        out = {}
        for key, doc in index.docs.items():
            stored = doc.vectors.get(spec["field"], {})
            shared = [t for t in query if t in stored]
            if shared:
                score = np.float32(0)
                for token in shared:
                    score = np.float32(score + np.float32(query[token]) * stored[token])
                out[key] = float(score)
        return out

    def _script_score(self, index: Index, spec: dict[str, Any]) -> dict[str, float]:
        keys_within(spec, {"query", "script", "min_score", "boost"}, "script_score")
        script = spec["script"]
        keys_within(script, {"source", "params", "lang"}, "script")
        match = SCRIPT_RE.match(script["source"])
        check(match, f"the fake does not run the script {script['source']!r}")
        function, vector_param, field, offset_param = match.groups()
        params = script.get("params") or {}
        mapped = index.field(field) or {}
        if function == "maxSimDotProduct":
            check(
                mapped.get("type") == "rank_vectors",
                f"maxSimDotProduct on a {mapped.get('type')} field",
            )
            if not self.enterprise:
                raise licence_error("Rank Vectors")
        else:
            check(
                mapped.get("type") == "dense_vector", f"dotProduct on a {mapped.get('type')} field"
            )
        query = np.asarray(params[vector_param], dtype=np.float32)
        offset = float(params[offset_param]) if offset_param else 0.0
        out = {}
        for key in self._docs(index, spec["query"]):
            stored = index.docs[key].vectors.get(field)
            check(stored is not None, f"document {key} has no {field}")
            if function == "dotProduct":
                value = float(np.float32(stored @ query))
            else:
                value = float(np.sum((query @ stored.T).max(axis=1), dtype=np.float32))
            score = value + offset
            if score < 0:
                raise EsError(
                    400,
                    "illegal_argument_exception",
                    f"script_score script returned an invalid score [{score}] for doc [{key}]. Must be a non-negative score!",
                )
            out[key] = float(np.float32(score))
        return out

    def _match(self, index: Index, spec: dict[str, Any]) -> dict[str, float]:
        ((path, condition),) = spec.items()
        words = set(
            str(condition["query"] if isinstance(condition, dict) else condition).lower().split()
        )
        out = {}
        for key, doc in index.docs.items():
            tokens = " ".join(doc.fields.get(path, [])).lower().split()
            hits = sum(t in words for t in tokens)
            if hits:
                out[key] = hits / (hits + 1.0)  # a stand-in for BM25
        return out

    def _knn(self, index: Index, spec: dict[str, Any]) -> list[tuple[str, float]]:
        keys_within(
            spec,
            {
                "field",
                "query_vector",
                "k",
                "num_candidates",
                "filter",
                "rescore_vector",
                "similarity",
                "boost",
            },
            "knn",
        )
        mapped = index.field(spec.get("field", "")) or {}
        check(
            mapped.get("type") == "dense_vector" and mapped.get("index", True),
            f"knn on {spec.get('field')}",
        )
        k, candidates = spec.get("k"), spec.get("num_candidates")
        check(
            isinstance(k, int) and isinstance(candidates, int),
            "knn needs integer k and num_candidates",
        )
        if not 1 <= k <= candidates <= 10_000:
            raise EsError(
                400,
                "illegal_argument_exception",
                f"[num_candidates] cannot be less than [k] (k {k}, num_candidates {candidates})",
            )
        query = np.asarray(spec.get("query_vector"), dtype=np.float32)
        if query.shape != (mapped["dims"],):
            raise EsError(
                400,
                "illegal_argument_exception",
                f"the query vector has {query.size} dimensions, the field has {mapped['dims']}",
            )
        if abs(float(query @ query) - 1) > 1e-4:
            raise EsError(
                400,
                "illegal_argument_exception",
                "The [dot_product] similarity can only be used with unit-length vectors.",
            )
        quantized = (mapped.get("index_options") or {}).get("type", "int8_hnsw") in QUANTIZED
        rescore = spec.get("rescore_vector")
        if rescore is not None:
            check(quantized, "rescore_vector on a float (non-quantized) index")
            keys_within(rescore, {"oversample"}, "rescore_vector")
            check(rescore["oversample"] >= 1, "rescore_vector.oversample >= 1")
        allowed = self._docs(index, spec["filter"]) if "filter" in spec else index.docs
        scored = []
        for key in allowed:
            vector = index.docs[key].vectors[spec["field"]]
            if quantized and rescore is None:
                vector = int8_copy(vector)
            scored.append(
                (
                    key,
                    float(np.float32((np.float32(1) + np.float32(vector @ query)) / np.float32(2))),
                )
            )
        return sorted(scored, key=lambda item: -item[1])[:k]

    # --- search ---------------------------------------------------------------------------

    def _search(self, name: str, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        keys_within(
            body,
            {"query", "knn", "retriever", "size", "_source", "track_total_hits", "sort"},
            "search body",
        )
        check(set(params) <= {"scroll"}, f"search parameters {sorted(params)}")
        index = self._index(name)
        size = body.get("size", 10)
        check(isinstance(size, int) and size >= 0, f"size {size!r}")
        if size > 10_000 and "scroll" not in params:
            raise EsError(400, "illegal_argument_exception", "Result window is too large")
        check(
            sum(k in body for k in ("query", "knn", "retriever")) <= 1,
            "combine at most one of query, knn, retriever",
        )
        if "retriever" in body:
            ranked = self._retriever(index, body["retriever"], size)
        elif "knn" in body:
            ranked = self._knn(index, body["knn"])
        else:
            scores = self._docs(index, body.get("query", {"match_all": {}}))
            ranked = sorted(scores.items(), key=lambda item: -item[1])
        if "sort" in body:
            check(
                body["sort"] == ["_doc"] and "scroll" in params,
                "sort is only used as [_doc] with scroll",
            )
            ranked = [(k, None) for k in index.docs if k in dict(ranked)]
        hits = [self._hit(index, key, score, body.get("_source", True)) for key, score in ranked]
        if "scroll" in params:
            scroll_id = f"scroll-{next(self._scroll_ids)}"
            self._scrolls[scroll_id] = (size, hits[size:])
            return 200, {"_scroll_id": scroll_id, "hits": {"hits": hits[:size]}}
        return 200, {
            "took": 1,
            "timed_out": False,
            "hits": {"max_score": None, "hits": hits[:size]},
        }

    def _retriever(
        self, index: Index, tree: dict[str, Any], window: int
    ) -> list[tuple[str, float]]:
        check(
            isinstance(tree, dict) and len(tree) == 1,
            f"a retriever is an object with one key: {tree!r}",
        )
        ((kind, spec),) = tree.items()
        if kind == "standard":
            keys_within(spec, {"query", "filter"}, "standard retriever")
            scores = self._docs(index, spec.get("query", {"match_all": {}}))
            if "filter" in spec:
                allowed = self._docs(index, spec["filter"])
                scores = {k: s for k, s in scores.items() if k in allowed}
            return sorted(scores.items(), key=lambda item: -item[1])
        if kind == "knn":
            return self._knn(index, spec)
        if kind in ("rrf", "linear"):
            if not self.enterprise:
                raise licence_error(
                    "Reciprocal Rank Fusion (RRF)" if kind == "rrf" else "linear retriever"
                )
            keys_within(
                spec,
                {"retrievers", "rank_constant", "rank_window_size", "filter"},
                f"{kind} retriever",
            )
            children = spec.get("retrievers")
            check(
                isinstance(children, list) and len(children) >= 2,
                f"{kind} needs two or more retrievers",
            )
            size = spec.get("rank_window_size", 10)
            check(
                isinstance(size, int) and size >= max(window, 1),
                f"rank_window_size {size} < size {window}",
            )
            check("filter" not in spec, "filters go into each child retriever")
            fused: dict[str, float] = {}
            if kind == "rrf":
                constant = spec.get("rank_constant", 60)
                check(
                    isinstance(constant, int) and constant >= 1,
                    f"rank_constant {constant!r} must be an integer >= 1",
                )
                for child in children:
                    for rank, (key, _) in enumerate(
                        self._retriever(index, child, size)[:size], start=1
                    ):
                        fused[key] = fused.get(key, 0.0) + 1.0 / (constant + rank)
            else:
                check(spec.get("rank_constant") is None, "linear has no rank_constant")
                for child in children:
                    keys_within(child, {"retriever", "weight", "normalizer"}, "linear child")
                    check(child.get("normalizer", "none") in ("none", "minmax"), "normalizer")
                    ranked = self._retriever(index, child["retriever"], size)[:size]
                    low, high = (
                        (min(s for _, s in ranked), max(s for _, s in ranked)) if ranked else (0, 0)
                    )
                    for key, score in ranked:
                        if child.get("normalizer", "none") == "minmax":
                            score = (score - low) / (high - low) if high > low else 1.0
                        fused[key] = fused.get(key, 0.0) + child.get("weight", 1.0) * score
            return [
                (k, float(np.float32(s)))
                for k, s in sorted(fused.items(), key=lambda item: -item[1])
            ][:size]
        raise Violation(f"the fake does not implement the {kind} retriever")

    def _hit(self, index: Index, key: str, score: float | None, source_spec: Any) -> dict[str, Any]:
        doc = index.docs[key]
        hit: dict[str, Any] = {"_index": index.name, "_id": key, "_score": score}
        if source_spec is False:
            return hit
        includes, want_vectors = None, False
        if isinstance(source_spec, list):
            includes = source_spec
        elif isinstance(source_spec, dict):
            allowed = {"includes", "excludes"} | (
                {"exclude_vectors"} if self.version >= (9, 2) else set()
            )
            if set(source_spec) - allowed:
                raise EsError(
                    400,
                    "x_content_parse_exception",
                    f"[_source] unknown field {sorted(set(source_spec) - allowed)}",
                )
            includes = source_spec.get("includes")
            want_vectors = source_spec.get("exclude_vectors") is False
        source = dict(doc.source)
        if index.exclude_vectors and want_vectors:  # rehydrated from what is indexed
            for field, value in doc.vectors.items():
                if isinstance(value, dict):
                    source[field] = {t: float(w) for t, w in value.items()}
                else:
                    source[field] = value.tolist()
        if includes is not None:
            source = {k: v for k, v in source.items() if k in includes}
        hit["_source"] = source
        return hit

    def _scroll(self, body: dict[str, Any]) -> tuple[int, Any]:
        keys_within(body, {"scroll_id", "scroll"}, "scroll body")
        if body["scroll_id"] not in self._scrolls:
            raise EsError(404, "search_context_missing_exception", "No search context found")
        size, rest = self._scrolls[body["scroll_id"]]
        page, self._scrolls[body["scroll_id"]] = rest[:size], (size, rest[size:])
        return 200, {"_scroll_id": body["scroll_id"], "hits": {"hits": page}}

    def _clear_scroll(self, body: dict[str, Any]) -> tuple[int, Any]:
        ids = as_list(body.get("scroll_id"))
        freed = sum(self._scrolls.pop(i, None) is not None for i in ids)
        return 200, {"succeeded": True, "num_freed": freed}

    def _count(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        keys_within(body, {"query"}, "count body")
        return 200, {
            "count": len(self._docs(self._index(name), body.get("query", {"match_all": {}})))
        }

    def _delete_by_query(
        self, name: str, body: dict[str, Any], params: dict[str, str]
    ) -> tuple[int, Any]:
        keys_within(body, {"query"}, "delete_by_query body")
        check(
            set(params) <= {"refresh", "conflicts"}, f"delete_by_query parameters {sorted(params)}"
        )
        index = self._index(name)
        doomed = list(self._docs(index, body["query"]))
        for key in doomed:
            del index.docs[key]
        return 200, {"took": 1, "deleted": len(doomed), "total": len(doomed), "failures": []}
