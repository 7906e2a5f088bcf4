"""One ``Error:`` line for every failure the command line expects, naming the store and what to do.

A failure of a database client (a store another process holds, a server that is not there,
credentials it refuses) reaches the command line as that client's exception, often wrapped two
or three times. :func:`explain` walks the exception chain, recognises these cases and writes
one sentence; m3connect's own errors (a missing store, another model, a bad record) already
say what to do and are shown as they are. ``m3connect -v ...`` prints the traceback as well.

Only click is imported here: the database clients are recognised by their exception's class
name and message, so that the command line's start stays fast and the core needs none of them.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence

import click

__all__ = ["CliError", "explain", "handle_failure", "set_stores", "show_traceback"]

_META_STORES = "m3connect.stores"
_META_VERBOSE = "m3connect.verbose"


class CliError(click.ClickException):
    """An expected failure: ``Error: <one line>`` on stderr, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def set_stores(uris: Sequence[object]) -> None:
    """Tell the error handler which stores the running command uses (for the message)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_META_STORES] = [str(u) for u in uris]


def set_verbose(ctx: click.Context, verbose: int) -> None:
    ctx.meta[_META_VERBOSE] = verbose


def show_traceback(ctx: click.Context, exc: BaseException) -> None:
    """With ``-v``: the traceback of the failure behind ``exc`` (a ClickException made
    ``from None`` still holds it as its context)."""
    if not ctx.meta.get(_META_VERBOSE):
        return
    inner = exc.__cause__ or exc.__context__ if isinstance(exc, click.ClickException) else exc
    if inner is not None:
        click.echo("".join(traceback.format_exception(inner)).rstrip(), err=True)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, ``__context__``, and the ``source``
    that qdrant-client's ResponseHandlingException wraps)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "source", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:199] + "…"


_CONNECT_CLASSES = {
    "ConnectError",  # httpx (qdrant-client)
    "ConnectTimeout",
    "ConnectionError",  # elastic_transport, requests
    "ConnectionTimeout",
    "NewConnectionError",
    "MaxRetryError",
}


def _is_locked(exc: BaseException) -> bool:
    text = str(exc)
    return "already accessed by another instance" in text or (
        "Open local milvus failed" in text and "not exists" not in text
    )


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if type(exc).__name__ in _CONNECT_CLASSES:
        return True
    text = str(exc)
    return "Fail connecting to server" in text or "server unavailable" in text


def _status(exc: BaseException) -> int | None:
    for name in ("status_code", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    meta = getattr(exc, "meta", None)
    value = getattr(meta, "status", None)
    return value if isinstance(value, int) else None


def _is_refused_credentials(exc: BaseException) -> bool:
    if _status(exc) in (401, 403):
        return True
    text = str(exc).lower()
    # pymilvus: "auth check failure", "user hasn't authenticated", "unauthenticated".
    return type(exc).__name__ == "MilvusException" and (
        "authenticat" in text or "auth check" in text or "permission denied" in text
    )


def _which_store(chain: list[BaseException], stores: Sequence[str]) -> str:
    from m3connect.indexing import STORE_ATTRIBUTE  # set by the job on a store's failure

    for exc in chain:
        named = getattr(exc, STORE_ATTRIBUTE, None)
        if named:
            return str(named)
    if len(stores) == 1:
        return stores[0]
    text = " ".join(str(e) for e in chain)
    for store in stores:
        location = store.split(":", 1)[-1].split("#", 1)[0].lstrip("/")
        if location and location.split("/", 1)[0] in text:
            return store
    return " or ".join(stores) if stores else "the store"


def _credential_names(store: str) -> str:
    from m3connect.uris import CREDENTIAL_ENV

    kind = store.split("+", 1)[0].split(":", 1)[0]
    kind = {"es": "elasticsearch"}.get(kind, kind)
    names = CREDENTIAL_ENV.get(kind)
    if not names:
        names = tuple(n for group in CREDENTIAL_ENV.values() for n in group)
    return " / ".join(names)


def explain(exc: BaseException, stores: Sequence[str] = ()) -> str | None:
    """One line for a failure the command line expects, or ``None`` for anything else."""
    chain = list(_chain(exc))
    store = _which_store(chain, stores)
    for inner in chain:
        if _is_locked(inner):
            return (
                f"{store} is in use by another process: an embedded store opens in one process "
                f"at a time. Wait for that process to finish (or stop it), or use a server for "
                f"concurrent access (qdrant+http://..., milvus+http://...)."
            )
    for inner in chain:
        if _is_refused_credentials(inner):
            status = _status(inner)
            code = f" (HTTP {status})" if status else ""
            return (
                f"{store} refused the credentials{code}: set {_credential_names(store)} in the "
                f"environment to ones the server accepts ({_first_line(inner)})."
            )
    unreachable = [inner for inner in chain if _is_unreachable(inner)]
    if unreachable:
        inner = unreachable[-1]  # the innermost says it best: "Connection refused"
        return (
            f"cannot reach the server of {store} ({type(inner).__name__}: "
            f"{_first_line(inner)}): is it running, and are the host and port right?"
        )
    return None


def handle_failure(ctx: click.Context, exc: Exception) -> click.ClickException:
    """The ClickException to raise for ``exc`` (an exception no command turned into one)."""
    from m3connect.cli_jobs import known_errors

    show_traceback(ctx, exc)
    stores = ctx.meta.get(_META_STORES, [])
    message = explain(exc, stores)
    if message is None and isinstance(exc, known_errors()):
        message = str(exc)
    if message is None:
        hint = "" if ctx.meta.get(_META_VERBOSE) else "; run with -v for the traceback"
        message = f"unexpected {type(exc).__name__}: {_first_line(exc)}{hint}"
    error = CliError(message)
    error.__cause__ = exc
    return error
