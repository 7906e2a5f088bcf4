"""Store URIs: parsing, defaults, errors, and credentials that never show."""

from __future__ import annotations

import logging

import pytest
from store_contract import FINGERPRINT, OTHER_FINGERPRINT, synthetic_embeddings

from m3connect.fingerprint import FingerprintMismatchError
from m3connect.store import M3Store
from m3connect.stores.memory import InMemoryStore
from m3connect.uris import (
    DEFAULT_COLLECTION,
    DEFAULT_STORE_URI,
    StoreURI,
    UriError,
    open_store,
    parse_store_uri,
    redact_uri,
)

SECRET = "s3cr3t-value-never-logged"


@pytest.mark.parametrize(
    ("text", "kind", "location", "collection", "remote"),
    [
        ("memory:", "memory", "", "", False),
        ("memory:#shared", "memory", "", "shared", False),
        ("qdrant:./data/q", "qdrant", "./data/q", DEFAULT_COLLECTION, False),
        ("qdrant:./data/q#docs", "qdrant", "./data/q", "docs", False),
        ("qdrant:", "qdrant", "./m3connect.qdrant", DEFAULT_COLLECTION, False),
        ("qdrant::memory:#t", "qdrant", ":memory:", "t", False),
        ("qdrant+http://localhost:6333/docs", "qdrant", "http://localhost:6333", "docs", True),
        ("qdrant+https://q.example.com#docs", "qdrant", "https://q.example.com:6333", "docs", True),
        ("QDRANT+HTTP://h:1/c", "qdrant", "http://h:1", "c", True),
        ("milvus:./m3.db", "milvus", "./m3.db", DEFAULT_COLLECTION, False),
        ("milvus:/abs/m3.db#docs", "milvus", "/abs/m3.db", "docs", False),
        ("milvus:", "milvus", "./m3connect.db", DEFAULT_COLLECTION, False),
        ("milvus+http://localhost:19530/docs", "milvus", "http://localhost:19530", "docs", True),
        (
            "milvus+https://m.example.com",
            "milvus",
            "https://m.example.com:19530",
            DEFAULT_COLLECTION,
            True,
        ),
        ("es+http://localhost:9200/docs", "elasticsearch", "http://localhost:9200", "docs", True),
        (
            "es+https://es.example.com/docs",
            "elasticsearch",
            "https://es.example.com:9200",
            "docs",
            True,
        ),
        ("elasticsearch+http://h:9200/docs", "elasticsearch", "http://h:9200", "docs", True),
    ],
)
def test_parse(text: str, kind: str, location: str, collection: str, remote: bool) -> None:
    uri = parse_store_uri(text)
    assert (uri.kind, uri.location, uri.collection, uri.remote) == (
        kind,
        location,
        collection,
        remote,
    )
    assert uri.embedded is (not remote)
    # str() round-trips to the same URI
    assert parse_store_uri(str(uri)) == uri


def test_default_store_is_embedded_qdrant() -> None:
    uri = parse_store_uri(DEFAULT_STORE_URI)
    assert uri.kind == "qdrant" and uri.embedded and uri.collection == DEFAULT_COLLECTION


def test_milvus_database_and_options() -> None:
    uri = parse_store_uri(
        "milvus+http://h:19530/analytics/docs?colbert_dtype=float16&max_colbert_vectors=512"
    )
    assert (uri.database, uri.collection) == ("analytics", "docs")
    assert uri.options == {"colbert_dtype": "float16", "max_colbert_vectors": 512}
    assert parse_store_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("postgres://h/db", "unknown store URI"),
        ("http://localhost:6333/docs", "name the database"),
        ("nothing", "unknown store URI"),
        ("", "non-empty"),
        ("qdrant://host:6333/c", r"qdrant\+http://host"),
        ("qdrant+http://h:6333/a/b", "one collection"),
        ("qdrant+http://h:6333/a#b", "two collections"),
        ("es+http://h:9200/Docs", "lowercase"),
        ("qdrant:./p#bad name", "collection name"),
        ("qdrant:./p?colour=red", "unknown store option"),
        ("qdrant:./p?max_colbert_vectors=many", "not a valid int"),
        ("qdrant+http://:6333/c", "no host"),
        ("memory:somewhere", "fragment"),
    ],
)
def test_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        parse_store_uri(text)


def test_unknown_scheme_lists_the_known_forms() -> None:
    with pytest.raises(UriError) as info:
        parse_store_uri("redis://localhost/0")
    for form in ("memory:", "qdrant:", "milvus:", "es+http://"):
        assert form in str(info.value)


@pytest.mark.parametrize(
    "text", ["qdrant+https://user:%s@h:6333/c", "es+https://elastic:%s@h:9200/i"]
)
def test_credentials_in_a_uri_are_refused_and_redacted(text: str) -> None:
    with pytest.raises(UriError) as info:
        parse_store_uri(text % SECRET)
    assert SECRET not in str(info.value)
    assert "environment" in str(info.value)


def test_credentials_come_from_the_environment_and_never_show(monkeypatch, caplog) -> None:
    monkeypatch.setenv("ES_API_KEY", SECRET)
    monkeypatch.setenv("QDRANT_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    es = parse_store_uri("es+https://es.example.com/docs")
    qdrant = parse_store_uri("qdrant+https://q.example.com/docs")
    for uri in (es, qdrant):
        shown = f"{uri} {uri!r} {uri.credentials_description()} {uri.__dict__}"
        assert SECRET not in shown
        assert "credentials from" in uri.credentials_description()
    # The clients get them (no request is made here).
    client = es.connect()
    try:
        assert client._headers["authorization"] == f"ApiKey {SECRET}"
    finally:
        client.close()
    assert SECRET not in caplog.text


def test_es_basic_auth_needs_both(monkeypatch) -> None:
    monkeypatch.delenv("ES_API_KEY", raising=False)
    monkeypatch.setenv("ES_USERNAME", "elastic")
    monkeypatch.delenv("ES_PASSWORD", raising=False)
    with pytest.raises(UriError, match="ES_PASSWORD"):
        parse_store_uri("es+http://h:9200/i").connect()
    monkeypatch.setenv("ES_PASSWORD", SECRET)
    client = parse_store_uri("es+http://h:9200/i").connect()
    try:
        assert client._headers.get("authorization", "").startswith("Basic ")
    finally:
        client.close()


def test_memory_stores() -> None:
    first = open_store("memory:").store
    second = open_store("memory:").store
    assert isinstance(first, InMemoryStore) and first is not second
    a = open_store("memory:#test-uris-shared", fingerprint=FINGERPRINT).store
    b = open_store("memory:#test-uris-shared").store
    assert a is b
    a.add(["x"], synthetic_embeddings(1, seed=3), ["x"])
    with pytest.raises(FingerprintMismatchError):
        open_store("memory:#test-uris-shared", fingerprint=OTHER_FINGERPRINT)


@pytest.mark.parametrize("scheme", ["qdrant", "milvus"])
def test_embedded_stores_open_and_reopen(tmp_path, scheme: str) -> None:
    path = tmp_path / ("q" if scheme == "qdrant" else "m.db")
    uri = f"{scheme}:{path}#docs"
    with open_store(uri, fingerprint=FINGERPRINT) as handle:
        assert isinstance(handle.store, M3Store)
        handle.store.add(["a", "b"], synthetic_embeddings(2, seed=1), ["a", "b"])
    with open_store(uri) as handle:  # the fingerprint is read back from the collection
        assert handle.store.count() == 2
        assert handle.store.fingerprint.heads_sha256 == FINGERPRINT.heads_sha256
    with pytest.raises(FingerprintMismatchError):
        open_store(uri, fingerprint=OTHER_FINGERPRINT)


def test_store_uri_is_hashable_and_comparable() -> None:
    a, b = parse_store_uri("qdrant:./x#c"), parse_store_uri("qdrant:./x#c")
    assert a == b and hash(a) == hash(b)
    assert isinstance(a, StoreURI)


@pytest.mark.slow
def test_milvus_file_written_by_another_process(tmp_path) -> None:
    """A Milvus Lite file written (and closed) by one process opens, loaded, in the next."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    uri = f"milvus:{tmp_path / 'm.db'}"
    code = (
        "from m3connect.uris import open_store\n"
        "from store_contract import FINGERPRINT, synthetic_embeddings\n"
        f"with open_store({uri!r}, fingerprint=FINGERPRINT) as h:\n"
        "    h.store.add(['a', 'b'], synthetic_embeddings(2, seed=1), ['a', 'b'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    with open_store(uri) as handle:
        assert handle.store.count() == 2
        query = handle.store.get(["a"], with_vectors=True)[0].embedding
        assert handle.store.search(query, mode="dense", k=1)[0].id == "a"


# --- redaction (issue 15) -----------------------------------------------------------------------

URL_SPECIAL = "/?#@:%&=;+ []!$'()*,\"\\<>^`{|}~"
SECRET_HEAD, SECRET_TAIL = "Hq7Zw", "Vk9Rm"


def _secret(char: str) -> str:
    return f"{SECRET_HEAD}{char}{SECRET_TAIL}"


def _assert_hidden(text: str) -> None:
    assert SECRET_HEAD not in text and SECRET_TAIL not in text, text


@pytest.mark.parametrize("char", list(URL_SPECIAL) + ["%2F", "%40", "@@", "//"])
@pytest.mark.parametrize(
    "template",
    [
        "es+http://user:{}@host:9200/idx",
        "es+https://elastic:{}@host/idx?max_colbert_vectors=4",
        "qdrant+http://user:{}@host:6333/c#c",
        "milvus+https://root:{}@host:19530/db/c",
        "http://user:{}@host:9200/idx",  # an unknown scheme is echoed too
        "es+http://:{}@host/idx",
    ],
)
def test_a_password_never_shows_whatever_its_characters(template: str, char: str) -> None:
    raw = template.format(_secret(char))
    with pytest.raises(UriError) as info:
        parse_store_uri(raw)
    _assert_hidden(str(info.value))
    _assert_hidden(redact_uri(raw))
    if not char.isspace():
        _assert_hidden(redact_uri(f"could not open {raw} (retrying)", in_text=True))


@pytest.mark.parametrize(
    "key", ["api_key", "apikey", "token", "password", "secret", "access_token", "api%5Fkey", "x"]
)
@pytest.mark.parametrize("char", ["", "/", "?", ":", "%", "@", ";"])
def test_credential_like_options_never_show(key: str, char: str) -> None:
    for raw in (
        f"es+http://host:9200/idx?{key}={_secret(char)}",
        f"qdrant+https://host/c?max_colbert_vectors=8&{key}={_secret(char)}",
        f"qdrant:./local?{key}={_secret(char)}#c",
        f"memory:?{key}={_secret(char)}",
    ):
        with pytest.raises(UriError) as info:
            parse_store_uri(raw)
        _assert_hidden(str(info.value))
        _assert_hidden(redact_uri(raw))
        if char != "@":  # in free text an "@" in a value reads as userinfo: the rest shows
            _assert_hidden(redact_uri(f"opening {raw} failed", in_text=True))


def test_redaction_keeps_what_is_not_secret() -> None:
    shown = redact_uri("es+http://host:9200/idx?max_colbert_vectors=8&colbert_dtype=float16#x")
    assert shown == "es+http://host:9200/idx?max_colbert_vectors=8&colbert_dtype=float16#x"
    assert redact_uri("qdrant:./data/m3.qdrant#docs") == "qdrant:./data/m3.qdrant#docs"
    assert redact_uri("es+http://u:p@h/i") == "es+http://***"
    assert redact_uri("see es+http://u:p@h/i now", in_text=True) == "see es+http://***@h/i now"


def test_a_store_uri_built_by_hand_is_redacted_too() -> None:
    uri = StoreURI("elasticsearch", f"http://user:{_secret('/')}@h:9200", "idx", True)
    _assert_hidden(str(uri))
    _assert_hidden(repr(uri))
    _assert_hidden(f"{uri}")


def test_the_cli_never_echoes_a_password(caplog) -> None:
    from click.testing import CliRunner

    from m3connect.cli import main

    caplog.set_level(logging.DEBUG)
    raw = f"es+http://elastic:{_secret('#')}@localhost:9200/docs"
    result = CliRunner().invoke(main, ["search", raw, "a question"])
    assert result.exit_code != 0
    _assert_hidden(result.output)
    _assert_hidden(caplog.text)
    assert "environment" in result.output


def test_a_local_path_with_an_at_sign_round_trips() -> None:
    """str() of a parsed URI is what workers reopen: only remote URIs are ever redacted (and a
    parsed remote URI holds no "@")."""
    uri = parse_store_uri("qdrant:./data@v2/m3.qdrant#docs")
    assert parse_store_uri(str(uri)) == uri
    assert str(uri) == "qdrant:./data@v2/m3.qdrant#docs"
