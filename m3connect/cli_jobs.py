"""``m3connect index``, ``search``, ``eval`` and ``demo``: indexing jobs on the command line.

Registered in the main group by :mod:`m3connect.cli` (``main.add_command(...)``)::

    m3connect index corpus.jsonl --store qdrant-edge:./m3connect.edge --store es+http://localhost:9200/docs
    m3connect search "what is the capital of France?" --rerank all   # the default store
    m3connect search es+http://localhost:9200/docs "what is the capital of France?"
    m3connect eval ./scifact --model ./bge-m3   # indexed into ./m3connect-eval.edge#scifact
    m3connect demo --model ./bge-m3

``--model`` is a hub id (``BAAI/bge-m3``, the default), a local checkpoint folder, or
``random`` (a small random checkpoint of the same layout, built once in the user's cache:
the pipeline runs the same, the rankings mean nothing).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from m3connect.cli_errors import CliError, set_stores

__all__ = [
    "index_command",
    "search_command",
    "eval_command",
    "demo_command",
    "COMMANDS",
    "known_errors",
    "load_encoder",
]

# m3connect.encoder.DEFAULT_MODEL, repeated so that `--help` does not import torch.
DEFAULT_MODEL = "BAAI/bge-m3"
# m3connect.testing.RANDOM_MODEL, repeated for the same reason (a test keeps the two equal).
RANDOM_MODEL = "random"
SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"
#: Where the demo indexes the sample corpus: the embedded default store, its own collection.
DEMO_COLLECTION = "m3connect_sample"
#: Where ``eval`` indexes a dataset when no --store is named: a qdrant-edge store of its own
#: (evaluation corpora never mix with the user's index), one collection per dataset folder.
EVAL_STORE_PATH = "./m3connect-eval.edge"

_MODEL_HELP = (
    f"Hub id, local checkpoint folder, or '{RANDOM_MODEL}' (a small random checkpoint: "
    f"meaningless rankings, no download; `m3connect testing-checkpoint DIR` writes one)."
)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def load_encoder(
    model: str, device: str | None = None, dtype: str = "float32", *, hint: str = ""
) -> Any:
    """``M3Encoder.from_pretrained`` with a checkpoint problem turned into a one-line CLI error
    (the encoder's message says how to point at a local folder); ``hint`` is added to it."""
    from transformers.utils import logging as transformers_logging

    from m3connect.encoder import CheckpointError, M3Encoder

    # The command line has its own progress bars; transformers' "Loading weights" bar is noise.
    transformers_logging.disable_progress_bar()
    try:
        return M3Encoder.from_pretrained(model, device=device, dtype=dtype)
    except CheckpointError as exc:
        raise CliError(f"{exc}{hint}") from exc


def show_progress(progress: bool | None, quiet: bool) -> bool:
    """Progress bars: on a terminal, unless ``--quiet``; ``--progress``/``--no-progress``
    decide explicitly."""
    if quiet:
        return False
    if progress is not None:
        return progress
    return sys.stderr.isatty()


_progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (documents, chunks/s, ETA) [default: on a terminal].",
)
_quiet_option = click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar (and no summary for index)."
)


def known_errors() -> tuple[type[BaseException], ...]:
    from m3connect.evaluation import EvalError
    from m3connect.filters import FilterError
    from m3connect.fingerprint import FingerprintMismatchError
    from m3connect.indexing import IndexingError
    from m3connect.sources import SourceError
    from m3connect.store import StoreError
    from m3connect.uris import UriError

    return (
        IndexingError,
        SourceError,
        StoreError,
        UriError,
        FingerprintMismatchError,
        EvalError,
        FilterError,
    )


def _store_uris(stores: tuple[str, ...]) -> list[str]:
    from m3connect.uris import DEFAULT_STORE_URI, parse_store_uri

    uris = list(stores) or [DEFAULT_STORE_URI]
    try:
        for uri in uris:
            if parse_store_uri(uri).kind == "memory":
                raise click.BadParameter(
                    f"{uri} keeps nothing once the command ends; index into a store on disk "
                    f"({DEFAULT_STORE_URI}, milvus:./m3.db) or a server",
                    param_hint="--store",
                )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None
    set_stores(uris)
    return uris


def _model_option(default: str | None = DEFAULT_MODEL) -> Any:
    return click.option(
        "--model",
        default=default,
        show_default=default is not None,
        help=_MODEL_HELP,
    )


_device_option = click.option(
    "--device", default=None, help="torch device (default: cuda, then mps, then cpu)."
)
_dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype of the model body.",
)
_max_tokens_option = click.option(
    "--max-tokens",
    type=click.IntRange(4),
    default=None,
    help="Tokens per chunk, <s> and </s> included [default: the model's limit, 8192].",
)
_overlap_option = click.option(
    "--overlap",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Tokens shared by consecutive chunks.",
)
_batch_tokens_option = click.option(
    "--batch-tokens",
    type=click.IntRange(1),
    default=None,
    help="Padded tokens per forward pass [default: 16384].",
)


# --------------------------------------------------------------------------------------------
# index
# --------------------------------------------------------------------------------------------


@click.command("index")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--store",
    "stores",
    multiple=True,
    metavar="URI",
    help="Store URI, repeatable: each gets the same vectors [default: qdrant-edge:./m3connect.edge]. "
    "memory:, qdrant-edge:PATH, qdrant:PATH, qdrant+http(s)://host:6333/collection, "
    "milvus:FILE.db, "
    "milvus+http(s)://host:19530/collection, es+http(s)://host:9200/index; '#name' picks the "
    "collection. Credentials: QDRANT_API_KEY, MILVUS_TOKEN, ES_API_KEY or ES_USERNAME/ES_PASSWORD.",
)
@_model_option()
@_max_tokens_option
@_overlap_option
@_batch_tokens_option
@click.option(
    "--on-error",
    type=click.Choice(["skip", "stop"]),
    default="skip",
    show_default=True,
    help="A bad record (invalid JSON, no text, ...): report it and go on, or stop the job.",
)
@click.option(
    "--rebuild", is_flag=True, help="Drop each store's collection and index everything anew."
)
@click.option(
    "--write-batch",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Chunks encoded and written per step (a resumed job repeats at most one step).",
)
@click.option(
    "--format",
    "source_format",
    type=click.Choice(["jsonl", "parquet", "csv", "folder"]),
    default=None,
    help="Source format [default: from the file name].",
)
@click.option(
    "--id-field",
    default=None,
    help="Field holding the document id [default: _id, else id]; '@line' numbers by line.",
)
@click.option("--text-field", default="text", show_default=True, help="Field holding the text.")
@click.option("--title-field", default=None, help="Field holding a title, put before the text.")
@click.option(
    "--metadata-field",
    "metadata_fields",
    multiple=True,
    help="Field kept as metadata (repeatable) [default: every other field].",
)
@_device_option
@_dtype_option
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run on Ray Data: encoder actors, server stores written by the actors.",
)
@click.option(
    "--ray-workers", type=click.IntRange(1), default=2, show_default=True, help="Encoder actors."
)
@click.option(
    "--ray-batch-size",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Chunks per actor call.",
)
@click.option(
    "--ray-cpus", type=click.FloatRange(0), default=1.0, show_default=True, help="CPUs per actor."
)
@click.option(
    "--ray-gpus", type=click.FloatRange(0), default=0.0, show_default=True, help="GPUs per actor."
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster address [default: RAY_ADDRESS, else a local instance].",
)
@_progress_option
@_quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def index_command(
    source: Path,
    stores: tuple[str, ...],
    model: str,
    max_tokens: int | None,
    overlap: int,
    batch_tokens: int | None,
    on_error: str,
    rebuild: bool,
    write_batch: int,
    source_format: str | None,
    id_field: str | None,
    text_field: str,
    title_field: str | None,
    metadata_fields: tuple[str, ...],
    device: str | None,
    dtype: str,
    use_ray: bool,
    ray_workers: int,
    ray_batch_size: int,
    ray_cpus: float,
    ray_gpus: float,
    ray_address: str | None,
    progress: bool | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Index SOURCE (JSONL, Parquet, CSV, or a folder of .txt/.md files) into one or more stores.

    Documents are cut into chunks of at most --max-tokens tokens, encoded once (dense, sparse
    and ColBERT in one forward pass) and written to every --store. Chunk ids are
    "{doc_id}#{chunk_no}". The job is resumable: run the same command again after an
    interruption and it skips what is stored, re-indexes documents that changed, and writes the
    rest. Chunking settings are part of each store's fingerprint: other settings on an indexed
    store are an error (or, with --rebuild, a clean rebuild).

    A store that does not exist is created (only `index` creates stores; `search` refuses a
    path or collection that is not there).
    """
    from m3connect.indexing import IndexJob, RayOptions
    from m3connect.sources import open_source

    uris = _store_uris(stores)
    src = open_source(
        source,
        format=source_format,
        id_field=id_field,
        text_field=text_field,
        title_field=title_field,
        metadata_fields=list(metadata_fields) or None,
        on_error=on_error,  # type: ignore[arg-type]
    )
    encoder = load_encoder(model, device, dtype)
    ray = None
    if use_ray:
        ray = RayOptions(
            concurrency=ray_workers,
            batch_size=ray_batch_size,
            num_cpus=ray_cpus,
            num_gpus=ray_gpus,
            address=ray_address,
        )
    job = IndexJob(
        encoder,
        uris,
        max_tokens=max_tokens,
        overlap=overlap,
        batch_tokens=batch_tokens,
        rebuild=rebuild,
        write_chunks=write_batch,
        progress=show_progress(progress, quiet),
        ray=ray,
        model=model,
    )
    try:
        summary = job.run(src)
    except KeyboardInterrupt:
        _print_summary(job.summary, as_json, quiet)
        click.echo("interrupted: run the same command again to continue where it stopped", err=True)
        sys.exit(130)
    except known_errors() as exc:
        if job.summary.stores:  # the job had started
            _print_summary(job.summary, as_json, quiet)
        raise CliError(str(exc)) from exc
    except Exception as exc:  # a store in use, a database that went away, a network error
        from m3connect.cli_errors import explain

        if job.summary.stores:
            _print_summary(job.summary, as_json, quiet)
        reason = explain(exc, uris) or f"{type(exc).__name__}: {exc}"
        kept = " What was written is kept: run the same command again to continue."
        raise CliError(f"the job stopped: {reason}{kept if job.summary.docs else ''}") from exc
    _print_summary(summary, as_json, quiet)


def _print_summary(summary: Any, as_json: bool, quiet: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_dict(), ensure_ascii=False))
    elif not quiet:
        click.echo(summary.format(), err=True)


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


def _stored_model(fingerprint: Any) -> str | None:
    """The checkpoint a store was indexed with, when it can be loaded from here."""
    if fingerprint is None or fingerprint.model in ("", "unknown"):
        return None
    name = fingerprint.model
    if Path(name).expanduser().is_dir():
        return name
    from m3connect.encoder import _looks_like_path

    return None if _looks_like_path(name) else name


def _parse_weights(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        parts = tuple(float(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter(
            "three numbers: dense,sparse,colbert (e.g. 0.4,0.2,0.4)", param_hint="--weights"
        )
    return parts  # type: ignore[return-value]


def _search_target(values: tuple[str, ...]) -> tuple[str | None, str]:
    """``[URI] QUERY``: the store URI (``None``: the default store) and the query."""
    usage = (
        "give QUERY, or URI QUERY (`m3connect search URI QUERY`; quote a query of several words)"
    )
    if len(values) == 2:
        return values[0], values[1]
    if len(values) != 1:
        raise click.UsageError(f"got {len(values)} arguments: {usage}")
    (query,) = values
    if _looks_like_store_uri(query):
        raise click.UsageError(f"{query!r} is a store URI and there is no QUERY: {usage}")
    return None, query


def _looks_like_store_uri(text: str) -> bool:
    """A single word that parses as a store URI: a search whose query was left out."""
    from m3connect.uris import UriError, parse_store_uri

    if not text or any(ch.isspace() for ch in text):
        return False
    try:
        parse_store_uri(text)
    except UriError:
        return False
    return True


def _nothing_indexed(uri: Any) -> CliError:
    """The default store is not there: one line saying so and how to make it."""
    return CliError(
        f"nothing is indexed at {uri.location} (the default store, {uri}): index your "
        f"documents first with `m3connect index SOURCE` (it writes there by default), or name "
        f"a store: `m3connect search URI QUERY`"
    )


@click.command("search")
@click.argument("target", nargs=-1, required=True, metavar="[URI] QUERY")
@click.option(
    "--mode",
    type=click.Choice(["dense", "sparse", "colbert", "hybrid"]),
    default="hybrid",
    show_default=True,
)
@click.option(
    "-k", "--k", "k", type=click.IntRange(1), default=10, show_default=True, help="Hits to return."
)
@click.option(
    "--fusion",
    type=click.Choice(["rrf", "weighted", "dbsf"]),
    default="rrf",
    show_default=True,
    help="How hybrid legs are fused.",
)
@click.option(
    "--legs",
    default="dense,sparse",
    show_default=True,
    help="Hybrid legs (two or three of dense,sparse,colbert).",
)
@click.option(
    "--rerank",
    type=click.Choice(["none", "colbert", "all"]),
    default="none",
    show_default=True,
    help="Re-rank the fused candidates.",
)
@click.option(
    "--candidates",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Candidates per leg / re-ranked.",
)
@click.option(
    "--weights",
    default=None,
    help="dense,sparse,colbert weights for weighted fusion and rerank=all [default: 0.4,0.2,0.4].",
)
@click.option(
    "--filter",
    "filter_json",
    default=None,
    metavar="JSON",
    help='Metadata filter, e.g. \'{"lang": "en", "year": {"$gte": 2020}}\'.',
)
@_model_option(default=None)
@_device_option
@click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
@click.option(
    "--width",
    type=click.IntRange(20),
    default=60,
    show_default=True,
    help="Characters of text shown per hit.",
)
def search_command(
    target: tuple[str, ...],
    mode: str,
    k: int,
    fusion: str,
    legs: str,
    rerank: str,
    candidates: int,
    weights: str | None,
    filter_json: str | None,
    model: str | None,
    device: str | None,
    as_json: bool,
    width: int,
) -> None:
    """Search the store URI for QUERY; print the ranked hits with each representation's score.

    Without URI, search the default store, qdrant-edge:./m3connect.edge (where `m3connect
    index` writes when it is given no --store). The model defaults to the checkpoint the store
    was indexed with (when it is here), else BAAI/bge-m3.
    """
    from m3connect.fingerprint import ModelFingerprint
    from m3connect.store import SearchParams
    from m3connect.uris import DEFAULT_STORE_URI, StoreNotFoundError, open_store, parse_store_uri

    store_uri, query = _search_target(target)
    known = known_errors()
    filter_value = None
    if filter_json:
        try:
            filter_value = json.loads(filter_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--filter") from None
    try:
        params = SearchParams(
            mode=mode,  # type: ignore[arg-type]
            k=k,
            candidates=candidates,
            fusion=fusion,  # type: ignore[arg-type]
            hybrid_legs=tuple(p.strip() for p in legs.split(",") if p.strip()),
            rerank=None if rerank == "none" else rerank,  # type: ignore[arg-type]
            filter=filter_value,
            **({"weights": w} if (w := _parse_weights(weights)) is not None else {}),
        )
        uri = parse_store_uri(store_uri or DEFAULT_STORE_URI)
    except known as exc:
        raise click.BadParameter(str(exc)) from None
    set_stores([uri])
    # A reading command never creates a store: a typo in the path is an error, not an empty store.
    try:
        handle = open_store(uri, create=False)
    except StoreNotFoundError as exc:
        if store_uri is None:
            raise _nothing_indexed(uri) from exc
        raise
    with handle:
        store = handle.store
        stored: ModelFingerprint | None = store.fingerprint
        name = model or _stored_model(stored) or DEFAULT_MODEL
        encoder = load_encoder(name, device)
        if stored is not None and stored.model != "unknown":
            try:
                # The store's fingerprint carries the job's settings (chunking) in ``extra``:
                # compare the model only.
                encoder.fingerprint.with_extra(**stored.extra).check_compatible(stored, str(uri))
            except known as exc:
                raise CliError(
                    f"{uri} was indexed with another model ({stored.model}; this one: "
                    f"{encoder.name}): pass the model the store was indexed with, "
                    f"--model {stored.model}"
                ) from exc
        embedding = encoder.encode_query(query)
        hits = store.search(embedding, params)
        if as_json:
            out = [
                {
                    "rank": rank,
                    "id": hit.id,
                    "score": hit.score,
                    "scores": hit.scores,
                    "text": hit.text,
                    "metadata": hit.metadata,
                }
                for rank, hit in enumerate(hits, start=1)
            ]
            click.echo(json.dumps(out, ensure_ascii=False, indent=2))
            return
        if not hits:
            from m3connect.indexing import plural

            count = store.count()
            click.echo(f"no hits ({uri} holds {plural(count, 'document')})")
            return
        click.echo(format_hits(hits, params, width))


def _final_score(params: Any) -> tuple[str, str]:
    """The name of the score that orders the hits, and what it is."""
    legs = "+".join(params.legs)
    if params.rerank == "all":
        weights = ", ".join(f"{w:g}" for w in params.weights)
        return "all", f"the weighted sum of the exact scores (dense, sparse, colbert: {weights})"
    if params.rerank == "colbert":
        return "colbert", "the exact ColBERT score of the re-ranked candidates"
    if len(params.legs) == 1:
        return params.legs[0], f"the exact {params.legs[0]} score"
    if params.fusion == "rrf":
        return "rrf", (
            f"reciprocal rank fusion of {legs} (sum of 1/({params.rrf_k:g} + rank): a rank score, not a "
            f"similarity)"
        )
    if params.fusion == "dbsf":
        return "dbsf", f"distribution-based score fusion of {legs}"
    return "weighted", f"the weighted mean of the exact {legs} scores"


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide characters take two, combining
    marks none."""
    import unicodedata

    return sum(
        0
        if unicodedata.combining(ch)
        else 2
        if unicodedata.east_asian_width(ch) in ("W", "F")
        else 1
        for ch in text
    )


def _fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns (with "…" when cut)."""
    if display_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = display_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def format_hits(hits: list[Any], params: Any, width: int = 60) -> str:
    """A readable table: rank, id, the score that orders the hits (named after what it is:
    rrf, weighted, all, ...), each representation's exact score, and the text; a legend says
    which is which. Columns align by display width (CJK characters take two)."""
    parts: tuple[str, ...] = params.scored_parts
    final, meaning = _final_score(params)
    ids = [str(h.id) for h in hits]
    id_width = min(40, max(2, *(display_width(i) for i in ids)))
    score_width = max(8, len(final))
    header = (
        f"{'#':>3}  {_pad('id', id_width)}  {final:>{score_width}}  |"
        + "".join(f"  {p:>8}" for p in parts)
        + "  text"
    )
    lines = [header, "-" * len(header)]
    for rank, (hit, doc_id) in enumerate(zip(hits, ids, strict=True), start=1):
        text = _fit(" ".join((hit.text or "").split()), width)
        shown_id = _pad(_fit(doc_id, id_width), id_width)
        scores = "".join(f"  {hit.scores.get(p, float('nan')):>8.4f}" for p in parts)
        lines.append(f"{rank:>3}  {shown_id}  {hit.score:>{score_width}.4f}  |{scores}  {text}")
    lines.append(
        f"{final}: {meaning}; it orders the hits. {', '.join(parts)}: each representation's "
        f"exact score."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def eval_store_default(data_dir: Path) -> str:
    """``eval``'s store when none is named: ``qdrant-edge:./m3connect-eval.edge#<dataset>``, the
    collection named after the dataset folder (characters a collection name cannot hold
    become ``_``), so that each dataset resumes in its own collection."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", data_dir.resolve().name)
    name = name.strip("._-")[:128] or "eval"
    return f"qdrant-edge:{EVAL_STORE_PATH}#{name}"


@click.command("eval")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_model_option()
@click.option(
    "--store",
    "store_uri",
    default=None,
    metavar="URI",
    help="Where the corpus is indexed (kept there: a second run resumes) [default: "
    f"qdrant-edge:{EVAL_STORE_PATH}#<name of DATA_DIR>]; memory: is gone when the command ends.",
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    help="qrels/<split>.tsv when there is no qrels.tsv.",
)
@click.option(
    "--modes",
    default="dense,sparse,colbert,dense+sparse,all",
    show_default=True,
    help="Modes to measure.",
)
@click.option(
    "--candidates",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="Candidates per leg, re-ranked by 'all'.",
)
@_max_tokens_option
@_overlap_option
@_batch_tokens_option
@click.option("--rebuild", is_flag=True, help="Drop the store's collection first.")
@_device_option
@_dtype_option
@_progress_option
@_quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as JSON here.",
)
def eval_command(
    data_dir: Path,
    model: str,
    store_uri: str | None,
    split: str,
    modes: str,
    candidates: int,
    max_tokens: int | None,
    overlap: int,
    batch_tokens: int | None,
    rebuild: bool,
    device: str | None,
    dtype: str,
    progress: bool | None,
    quiet: bool,
    as_json: bool,
    output: Path | None,
) -> None:
    """nDCG@10 and Recall@100 of each retrieval mode on a BEIR-format DATA_DIR (corpus.jsonl,
    queries.jsonl, qrels.tsv or qrels/<split>.tsv): the paper's ablation on your data.

    \b
    dense, sparse, colbert   one representation
    dense+sparse             weighted fusion 1 * dense + 0.3 * sparse (the paper's w)
    all                      dense+sparse candidates re-ranked by 1 * dense + 0.3 * sparse + 1 * colbert
    """
    from m3connect.evaluation import evaluate, write_report

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    default_store = store_uri is None
    store_uri = store_uri or eval_store_default(data_dir)
    set_stores([store_uri])
    encoder = load_encoder(model, device, dtype)
    report = evaluate(
        encoder,
        data_dir,
        store_uri,
        modes=mode_list,
        split=split,
        candidates=candidates,
        max_tokens=max_tokens,
        overlap=overlap,
        batch_tokens=batch_tokens,
        rebuild=rebuild,
        progress=show_progress(progress, quiet),
    )
    if default_store and not quiet:
        click.echo(f"the corpus is kept in {store_uri}: a second run resumes", err=True)
    if output is not None:
        write_report(report, output)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


_DEMO_MODEL_HINT = (
    " For the demo: `make demo MODEL=./bge-m3` (or `m3connect demo --model ./bge-m3`) with a local "
    "copy, or `make demo MODEL=random` (--model random) to see the pipeline run on a small "
    "random checkpoint (meaningless rankings)."
)


def _is_memory(uri: str) -> bool:
    from m3connect.uris import parse_store_uri

    return parse_store_uri(uri).kind == "memory"


def _demo_store_default() -> str:
    from m3connect.uris import DEFAULT_STORE_URI

    return f"{DEFAULT_STORE_URI}#{DEMO_COLLECTION}"


@click.command("demo")
@_model_option()
@click.option(
    "--store",
    "store_uri",
    default=None,
    metavar="URI",
    help="Store for the sample corpus [default: the embedded default store, collection m3connect_sample].",
)
@click.option(
    "--queries",
    "n_queries",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Sample queries to run.",
)
@click.option(
    "-k", "--k", "k", type=click.IntRange(1), default=3, show_default=True, help="Hits per query."
)
@_device_option
@_progress_option
@_quiet_option
def demo_command(
    model: str,
    store_uri: str | None,
    n_queries: int,
    k: int,
    device: str | None,
    progress: bool | None,
    quiet: bool,
) -> None:
    """Index the bundled sample corpus into the embedded default store and run a few searches.

    Offline, point --model at a local copy of BAAI/bge-m3 (or use --model random to see the
    pipeline run on a small random checkpoint).
    """
    from m3connect.evaluation import load_beir
    from m3connect.indexing import IndexingError, IndexJob, plural
    from m3connect.store import SearchParams
    from m3connect.uris import open_store

    if not (SAMPLE_DIR / "corpus.jsonl").is_file():
        raise CliError(f"the sample corpus is missing from {SAMPLE_DIR}")
    uri = store_uri or _demo_store_default()
    if _is_memory(uri):
        raise click.BadParameter(
            f"{uri} would be empty again when the demo searches it; use a store on disk",
            param_hint="--store",
        )
    set_stores([uri])
    encoder = load_encoder(model, device, hint=_DEMO_MODEL_HINT)
    corpus, queries, _qrels = load_beir(SAMPLE_DIR)
    bar = show_progress(progress, quiet)

    def run(rebuild: bool) -> Any:
        job = IndexJob(encoder, [uri], rebuild=rebuild, progress=bar, model=model)
        return job.run(
            corpus, id_field="_id", text_field="text", title_field="title", on_error="stop"
        )

    try:
        summary = run(rebuild=False)
    except IndexingError:
        if store_uri is not None:
            raise
        # The demo's own collection, indexed with another model: start it again.
        click.echo(f"{uri} was indexed with another model: rebuilding it.", err=True)
        summary = run(rebuild=True)
    click.echo(
        f"indexed the sample corpus into {uri}: {plural(summary.docs, 'document')} "
        f"({summary.indexed:,} encoded, {summary.skipped:,} already there) in "
        f"{summary.seconds:.1f} s"
    )
    with open_store(uri, create=False) as handle:
        for query in list(queries.values())[:n_queries]:
            params = SearchParams(mode="hybrid", k=k, rerank="all")
            hits = handle.store.search(encoder.encode_query(query), params)
            click.echo(f"\nquery: {query}")
            click.echo(format_hits(hits, params))
    click.echo(f'\nsearch it yourself: m3connect search "{uri}" "your question" --model {model}')


COMMANDS = (index_command, search_command, eval_command, demo_command)
