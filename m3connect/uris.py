"""Store URIs: one string names a store (database, place, collection) on the command line.

=================================== =========================================================
``memory:``                         a new in-memory reference store (gone when the process ends)
``memory:#name``                    an in-memory store shared by name within one process
``qdrant-edge:./path``              qdrant-edge: the Qdrant engine in this process, on disk
                                    (memory-mapped) under ``./path/<collection>``
``qdrant:./path``                   Qdrant local mode (qdrant-client), files under ``./path``
``qdrant::memory:``                 Qdrant local mode in memory
``qdrant+http://host:6333/coll``    a Qdrant server (``qdrant+https://`` with TLS)
``milvus:./m3.db``                  Milvus Lite, one file
``milvus+http://host:19530/coll``   a Milvus server (``/db/coll`` picks a database too)
``es+http://host:9200/index``       Elasticsearch (``es+https://``; ``elasticsearch+...`` too)
=================================== =========================================================

The collection (index) is the URL path or a ``#name`` fragment; without one it is
``m3connect``. ``qdrant-edge:``, ``qdrant:`` and ``milvus:`` without a path mean the embedded
default places ``./m3connect.edge``, ``./m3connect.qdrant`` and ``./m3connect.db``. Store options go in the query string:
``?colbert_dtype=float16&max_colbert_vectors=2048``.

Credentials never go in a URI (it would be in shell histories and logs); they come from the
environment when the store is opened: ``QDRANT_API_KEY``, ``MILVUS_TOKEN`` (``user:password``
or an API key), ``ES_API_KEY`` or ``ES_USERNAME`` + ``ES_PASSWORD`` (and ``ES_CA_CERTS`` for a
cluster with its own certificate authority). A :class:`StoreURI`
never holds them, so its ``str``/``repr`` are safe to log.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from m3connect.fingerprint import ModelFingerprint

if TYPE_CHECKING:
    from m3connect.encoder import M3Encoder
    from m3connect.store import M3Store

__all__ = [
    "UriError",
    "StoreNotFoundError",
    "StoreURI",
    "StoreHandle",
    "parse_store_uri",
    "open_store",
    "DEFAULT_STORE_URI",
    "DEFAULT_COLLECTION",
    "KINDS",
    "redact_uri",
]

DEFAULT_COLLECTION = "m3connect"
DEFAULT_QDRANT_PATH = "./m3connect.qdrant"
DEFAULT_MILVUS_PATH = "./m3connect.db"
DEFAULT_EDGE_PATH = "./m3connect.edge"
#: The store used when none is named: qdrant-edge in ``./m3connect.edge``, the real Qdrant engine
#: in this process. Its vectors are memory-mapped files (RAM stays bounded as the collection
#: grows), searches and ColBERT MaxSim run in the engine, and it ingests at the engine's rate
#: (benchmarks/bench_scale.py and the README's "Which embedded store"). Qdrant local mode
#: (``qdrant:``) is pure Python, for files that ``QdrantClient(path=...)`` already wrote.
DEFAULT_STORE_URI = f"qdrant-edge:{DEFAULT_EDGE_PATH}"

KINDS = ("memory", "qdrant-edge", "qdrant", "milvus", "elasticsearch")
_SCHEMES = {
    "memory": ("memory", False),
    "qdrant-edge": ("qdrant-edge", False),
    "qdrant": ("qdrant", False),
    "qdrant+http": ("qdrant", True),
    "qdrant+https": ("qdrant", True),
    "milvus": ("milvus", False),
    "milvus+http": ("milvus", True),
    "milvus+https": ("milvus", True),
    "es+http": ("elasticsearch", True),
    "es+https": ("elasticsearch", True),
    "elasticsearch+http": ("elasticsearch", True),
    "elasticsearch+https": ("elasticsearch", True),
}
_OPTIONS = {"colbert_dtype": str, "max_colbert_vectors": int}
_COLLECTION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")
_EXAMPLES = (
    "memory:, qdrant-edge:./path, qdrant:./path, qdrant+http://host:6333/collection, milvus:./m3.db, "
    "milvus+http://host:19530/collection, es+http://host:9200/index"
)

# Where each kind's credentials come from (names only, never values).
CREDENTIAL_ENV = {
    "qdrant": ("QDRANT_API_KEY",),
    "milvus": ("MILVUS_TOKEN",),
    "elasticsearch": ("ES_API_KEY", "ES_USERNAME", "ES_PASSWORD"),
}


class UriError(ValueError):
    """A store URI that cannot be understood."""


class StoreNotFoundError(UriError, LookupError):
    """A store opened for reading (``open_store(..., create=False)``) that does not exist: no
    file or folder at the path, or no such collection. A typo must not create an empty store."""


@dataclass(frozen=True)
class StoreURI:
    """A parsed store URI. Holds no secret: credentials are read from the environment by
    :meth:`connect`."""

    kind: str
    #: A file/folder path (embedded stores), a server URL (``http(s)://host:port``), or "" (memory).
    location: str
    collection: str
    remote: bool
    database: str | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def embedded(self) -> bool:
        """Whether the store lives in this process (memory, Qdrant local, Milvus Lite): such a
        store has one writer, and a second process cannot open it."""
        return not self.remote

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        query = f"?{query}" if query else ""
        if self.kind == "memory":
            return f"memory:{query}{'#' + self.collection if self.collection else ''}"
        if not self.remote:
            return f"{self.kind}:{self.location}{query}#{self.collection}"
        scheme = "es" if self.kind == "elasticsearch" else self.kind
        database = f"{self.database}/" if self.database else ""
        # Parsing refuses credentials; a StoreURI built by hand is redacted all the same.
        return redact_uri(f"{scheme}+{self.location}/{database}{self.collection}{query}")

    def __repr__(self) -> str:
        return f"StoreURI({str(self)!r})"

    def edge_path(self) -> Path:
        """The shard folder of a ``qdrant-edge:`` URI: ``<path>/<collection>``."""
        return Path(self.location).expanduser() / self.collection

    def credentials_description(self) -> str:
        """Where the credentials come from, for logs (never their values)."""
        names = [n for n in CREDENTIAL_ENV.get(self.kind, ()) if os.environ.get(n)]
        return f"credentials from {' + '.join(names)}" if names else "no credentials"

    # --- connecting ------------------------------------------------------------------------

    def connect(self) -> Any:
        """A new database client for this URI (``None`` for ``memory:`` and ``qdrant-edge:``,
        whose store opens its shard itself)."""
        if self.kind in ("memory", "qdrant-edge"):
            return None
        if self.kind == "qdrant":
            try:
                from qdrant_client import QdrantClient
            except ImportError:
                raise UriError(
                    f"{self} needs qdrant-client: pip install 'm3connect[qdrant]'"
                ) from None
            if self.remote:
                return QdrantClient(
                    url=self.location, api_key=os.environ.get("QDRANT_API_KEY") or None
                )
            if self.location == ":memory:":
                return QdrantClient(location=":memory:")
            return QdrantClient(path=self.location)
        if self.kind == "milvus":
            try:
                from pymilvus import MilvusClient
            except ImportError:
                raise UriError(f"{self} needs pymilvus: pip install 'm3connect[milvus]'") from None
            if self.remote:
                kwargs: dict[str, Any] = {"uri": self.location}
                token = os.environ.get("MILVUS_TOKEN")
                if token:
                    kwargs["token"] = token
                if self.database:
                    kwargs["db_name"] = self.database
                return MilvusClient(**kwargs)
            Path(self.location).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return MilvusClient(str(Path(self.location).expanduser()))
        try:
            from elasticsearch import Elasticsearch
        except ImportError:
            raise UriError(
                f"{self} needs elasticsearch: pip install 'm3connect[elasticsearch]'"
            ) from None
        kwargs = {}
        api_key = os.environ.get("ES_API_KEY")
        user, password = os.environ.get("ES_USERNAME"), os.environ.get("ES_PASSWORD")
        if api_key:
            kwargs["api_key"] = api_key
        elif user or password:
            if not (user and password):
                raise UriError("set both ES_USERNAME and ES_PASSWORD (or ES_API_KEY)")
            kwargs["basic_auth"] = (user, password)
        if os.environ.get("ES_CA_CERTS"):  # a cluster with its own certificate authority
            kwargs["ca_certs"] = os.environ["ES_CA_CERTS"]
        return Elasticsearch(self.location, **kwargs)

    def store_class(self) -> type[M3Store]:
        if self.kind == "memory":
            from m3connect.stores.memory import InMemoryStore

            return InMemoryStore
        try:
            if self.kind == "qdrant-edge":
                from m3connect.stores.qdrant import QdrantEdgeStore

                return QdrantEdgeStore
            if self.kind == "qdrant":
                from m3connect.stores.qdrant import QdrantStore

                return QdrantStore
            if self.kind == "milvus":
                from m3connect.stores.milvus import MilvusStore

                return MilvusStore
            from m3connect.stores.elasticsearch import ElasticsearchStore

            return ElasticsearchStore
        except ImportError as exc:
            raise UriError(f"the {self.kind} store adapter cannot be loaded: {exc}") from exc


class StoreHandle:
    """An open store plus the client it was opened with; :meth:`close` closes both."""

    def __init__(self, uri: StoreURI, store: M3Store, client: Any) -> None:
        self.uri = uri
        self.store = store
        self.client = client
        self.closed = False
        if client is not None:
            _OPEN_HANDLES.add(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _OPEN_HANDLES.discard(self)
        try:
            self.store.close()
        finally:
            _close_quietly(self.client)

    def __enter__(self) -> StoreHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreHandle({self.uri})"


_MEMORY_STORES: dict[str, M3Store] = {}
_MEMORY_LOCK = threading.Lock()
# Handles not closed by their user are closed at exit, while the interpreter still works: a
# Qdrant local client closed by the garbage collector during shutdown raises "sys.meta_path is
# None, Python is likely shutting down".
_OPEN_HANDLES: weakref.WeakSet[StoreHandle] = weakref.WeakSet()


@atexit.register
def _close_open_handles() -> None:
    for handle in list(_OPEN_HANDLES):
        with contextlib.suppress(Exception):
            handle.close()


def parse_store_uri(text: str | StoreURI) -> StoreURI:
    """Parse a store URI (see the module docs); raises :class:`UriError` with the forms it
    understands."""
    if isinstance(text, StoreURI):
        return text
    if not isinstance(text, str) or not text.strip():
        raise UriError(f"a store URI is a non-empty string such as {_EXAMPLES}")
    raw = text.strip()
    scheme, sep, rest = raw.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        shown = _redact(raw)
        hint = ""
        if scheme in ("http", "https"):
            hint = " (name the database: qdrant+http://..., milvus+http://..., es+http://...)"
        raise UriError(f"unknown store URI {shown!r}{hint}; use one of {_EXAMPLES}")
    kind, remote = _SCHEMES[scheme]
    # No part of a store URI holds an "@" but userinfo; a password holding "/", "?" or "#"
    # would end the host part early, so look at the whole text before parsing any of it.
    if remote and "@" in raw:
        _refuse_credentials(kind, raw)
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    options = _options(query, raw)
    if not remote:
        if kind == "memory":
            if rest.strip("/"):
                raise UriError(
                    f"memory: takes a name as a fragment (memory:#name), got {_redact(raw)!r}"
                )
            # memory: is a new store each time it is opened; memory:#name is shared by name.
            collection = _collection(fragment, raw) if fragment else ""
            return StoreURI("memory", "", collection, False, options=options)
        defaults = {"qdrant": DEFAULT_QDRANT_PATH, "qdrant-edge": DEFAULT_EDGE_PATH}
        location = rest or defaults.get(kind, DEFAULT_MILVUS_PATH)
        if location.startswith("//"):
            raise UriError(
                f"{scheme}: takes a path ({scheme}:./path or {scheme}:/abs/path); for a server "
                f"use {scheme}+http://host:port/collection"
            )
        collection = _collection(fragment or DEFAULT_COLLECTION, raw)
        return StoreURI(kind, location, collection, False, options=options)

    url = urlsplit(f"{scheme.split('+', 1)[1]}:{rest}")
    if url.username is not None or url.password is not None:
        _refuse_credentials(kind, raw)
    if not url.hostname:
        raise UriError(f"{_redact(raw)!r} has no host")
    try:
        port = url.port
    except ValueError:
        raise UriError(f"{_redact(raw)!r}: the port must be a number from 0 to 65535") from None
    location = f"{url.scheme}://{url.netloc}"
    if port is None:
        default_port = {"qdrant": 6333, "milvus": 19530, "elasticsearch": 9200}[kind]
        location = f"{location}:{default_port}"
    parts = [p for p in url.path.split("/") if p]
    database = None
    if kind == "milvus" and len(parts) == 2:
        database, parts = parts[0], parts[1:]
    if len(parts) > 1:
        raise UriError(f"{_redact(raw)!r}: the path names one collection, got {url.path!r}")
    from_path = parts[0] if parts else None
    if from_path and fragment and from_path != fragment:
        raise UriError(f"{_redact(raw)!r} names two collections ({from_path!r} and #{fragment})")
    collection = _collection(from_path or fragment or DEFAULT_COLLECTION, raw)
    if kind == "elasticsearch" and collection != collection.lower():
        raise UriError(f"Elasticsearch index names are lowercase, got {collection!r}")
    return StoreURI(kind, location, collection, True, database=database, options=options)


def _refuse_credentials(kind: str, raw: str) -> None:
    env = " / ".join(CREDENTIAL_ENV[kind])
    raise UriError(
        f"credentials do not go in a store URI (they would show in logs and shell history): "
        f"set {env} in the environment instead ({_redact(raw)})"
    )


def open_store(
    uri: str | StoreURI,
    *,
    encoder: M3Encoder | None = None,
    fingerprint: ModelFingerprint | None = None,
    create: bool = True,
    **options: Any,
) -> StoreHandle:
    """Connect and open the store ``uri`` names: a :class:`StoreHandle` (``.store``,
    ``.close()``). ``fingerprint``/``encoder`` are passed to the store (a stored collection of
    another model or other settings is a :class:`~m3connect.fingerprint.FingerprintMismatchError`);
    ``options`` add to the URI's query options. ``create=False`` opens an existing store only
    (for reading): a path or collection that is not there is a :class:`StoreNotFoundError`, and
    nothing is created."""
    parsed = parse_store_uri(uri)
    kwargs = {**parsed.options, **options}
    if fingerprint is not None:
        kwargs["fingerprint"] = fingerprint
    cls = parsed.store_class()
    if not create:
        _require_location(parsed)
    if parsed.kind == "memory":
        if not parsed.collection:
            return StoreHandle(parsed, cls(encoder, **kwargs), None)
        with _MEMORY_LOCK:
            store = _MEMORY_STORES.get(parsed.collection)
            if store is None:
                store = cls(encoder, **kwargs)
                _MEMORY_STORES[parsed.collection] = store
            elif fingerprint is not None and store.fingerprint is not None:
                fingerprint.check_compatible(store.fingerprint, f"the store {parsed}")
            elif fingerprint is not None:
                store.fingerprint = fingerprint
        # Closing an in-memory store does nothing: a named one outlives its handles.
        return StoreHandle(parsed, store, None)
    if parsed.kind == "qdrant-edge":
        # One shard per collection, in its own folder under the URI's path.
        return StoreHandle(parsed, cls(parsed.edge_path(), encoder, **kwargs), None)
    client = parsed.connect()
    try:
        if not create:
            _require_collection(parsed, client)
        store = cls(client, parsed.collection, encoder, **kwargs)  # type: ignore[call-arg]
    except BaseException:
        _close_quietly(client)
        raise
    return StoreHandle(parsed, store, client)


_CREATE_HINT = "`m3connect index SOURCE --store URI` creates a store"


def _require_location(parsed: StoreURI) -> None:
    """Before connecting (which would create it): the file or folder of an embedded store, or
    the named in-memory store, must exist."""
    if parsed.kind == "memory":
        with _MEMORY_LOCK:
            known = bool(parsed.collection) and parsed.collection in _MEMORY_STORES
        if not known:
            raise StoreNotFoundError(
                f"{parsed} is not a store: an in-memory store lives only in the process that "
                f"made it. Name a store on disk or a server; {_CREATE_HINT}"
            )
        return
    if parsed.remote or parsed.location in ("", ":memory:"):
        return
    path = Path(parsed.location).expanduser()
    if not path.exists():
        raise StoreNotFoundError(
            f"no store at {parsed.location} ({path.resolve()} does not exist): check the path "
            f"of {parsed}; {_CREATE_HINT}"
        )
    if parsed.kind == "qdrant-edge":
        _require_edge_shard(parsed, path)


def _require_edge_shard(parsed: StoreURI, path: Path) -> None:
    """A ``qdrant-edge:`` collection is a shard folder ``<path>/<collection>`` holding the
    engine's config file; opening a store on any other folder would create its lock file there."""
    config = getattr(parsed.store_class(), "CONFIG_FILE", "edge_config.json")
    if (parsed.edge_path() / config).is_file():
        return
    others = (
        sorted(p.name for p in path.iterdir() if (p / config).is_file()) if path.is_dir() else []
    )
    listing = f" (there: {', '.join(others[:10])})" if others else " (it holds none)"
    raise StoreNotFoundError(
        f"{parsed}: no collection {parsed.collection!r} at {parsed.location}{listing}; check "
        f"the name (the part after '#'); {_CREATE_HINT}"
    )


def _require_collection(parsed: StoreURI, client: Any) -> None:
    """The collection (index) must exist; the message lists the ones that do, when cheap."""
    others: list[str] | None = None
    if parsed.kind == "qdrant" and hasattr(client, "collection_exists"):
        if client.collection_exists(parsed.collection):
            return
        others = [c.name for c in client.get_collections().collections]
    elif parsed.kind == "milvus" and hasattr(client, "has_collection"):
        if client.has_collection(parsed.collection):
            return
        from m3connect.stores.milvus import COMPANION_SUFFIX

        others = [n for n in client.list_collections() if not n.endswith(COMPANION_SUFFIX)]
    elif parsed.kind == "elasticsearch" and hasattr(client, "indices"):
        if client.indices.exists(index=parsed.collection):
            return
    else:  # a kind (or client) this check does not know: the store itself decides
        return
    where = parsed.location if not parsed.remote else f"the server {parsed.location}"
    listing = ""
    if others is not None:
        listing = f" (there: {', '.join(sorted(others)[:10])})" if others else " (it holds none)"
    raise StoreNotFoundError(
        f"{parsed}: no collection {parsed.collection!r} at {where}{listing}; check the name "
        f"(the part after '#' or the URL path); {_CREATE_HINT}"
    )


def drop_memory_store(name: str) -> None:
    with _MEMORY_LOCK:
        _MEMORY_STORES.pop(name, None)


def _close_quietly(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # a client that is already closed
            close()


def _options(query: str, raw: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            # The name is echoed only when it looks like one (not a stray piece of a secret).
            shown = f" {key!r}" if _OPTION_NAME.fullmatch(key) else ""
            raise UriError(
                f"unknown store option{shown} in {_redact(raw)!r}; known: {', '.join(_OPTIONS)}"
            )
        try:
            options[key] = _OPTIONS[key](value)
        except ValueError:
            raise UriError(
                f"store option {key}={value!r} is not a valid {_OPTIONS[key].__name__}"
            ) from None
    return options


def _collection(name: str, raw: str) -> str:
    if not _COLLECTION_RE.match(name):
        raise UriError(
            f"collection name {name!r} in {_redact(raw)!r} must be letters, digits, '_', '-' or '.'"
        )
    return name


#: Query options whose values may be shown: the store options (never secrets). Every other
#: option's value is hidden, whatever its name (``api_key``, ``token``, ``password``, ...).
_SHOWN_OPTIONS = frozenset(_OPTIONS)
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,40}")


def redact_uri(raw: str, *, in_text: bool = False) -> str:
    """``raw`` (a store URI) safe to show in a message, a log line or a ``repr``: its userinfo
    (``scheme://user:password@``) is replaced by ``***``, and the value of every query option
    other than the store options by ``***``. ``in_text``: ``raw`` is free text holding URLs
    separated by whitespace (a password with a space cannot be told from the text there).

    A password may hold any character, ``/ ? # @ : %`` included, and an option value may hold
    an ``@``: where a secret ends cannot be told, so a URI with an ``@`` shows nothing after its
    scheme (in free text: nothing from ``//`` to the last ``@`` of the URL). This may hide more
    than the secret, never less."""
    if in_text:
        text = re.sub(r"//\S*@", "//***@", str(raw))
        return re.sub(r"([?&])([^=&#\s]*)=([^&#\s]*)", _redact_option, text)
    text = str(raw)
    if "@" in text:
        # Userinfo, or an "@" inside an option value: where the secret ends cannot be told,
        # so nothing after the scheme is shown.
        head, sep, _ = text.partition("//")
        return f"{head}//***" if sep else f"{text.partition(':')[0]}:***"
    base, question, rest = text.partition("?")
    if not question:
        return text
    query, hash_sign, fragment = rest.partition("#")
    return f"{base}?{'&'.join(_redact_pair(p) for p in query.split('&'))}{hash_sign}{fragment}"


def _redact_pair(pair: str) -> str:
    key, eq, _ = pair.partition("=")
    if eq and unquote(key).strip().lower() in _SHOWN_OPTIONS:
        return pair
    return f"{key}=***" if eq and _OPTION_NAME.fullmatch(key) else "***"


def _redact_option(match: re.Match[str]) -> str:
    sep, key, value = match.groups()
    if unquote(key).strip().lower() in _SHOWN_OPTIONS and "@" not in value:
        return match.group(0)
    return f"{sep}{key}=***"


def _redact(raw: str) -> str:
    return redact_uri(raw)
