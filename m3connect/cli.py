"""The ``m3connect`` command line.

``main`` is a click group; each subcommand is a separate function registered with
``@main.command``, so other modules can add theirs (``index``, ``search``, ``eval``) the same way
or with ``main.add_command``. Heavy imports (torch, transformers) happen inside the commands,
so ``m3connect --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import click

from m3connect import __version__
from m3connect.batching import DEFAULT_BATCH_TOKENS
from m3connect.cli_errors import handle_failure, set_verbose, show_traceback
from m3connect.types import DocId, M3Output, sparse_to_string_keys

__all__ = ["main"]

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = (".jsonl", ".npz")
# m3connect.encoder.DEFAULT_MODEL, repeated so that `m3connect --help` does not import torch
# (a test keeps the two equal).
DEFAULT_MODEL = "BAAI/bge-m3"


class _Main(click.Group):
    """The command group: an expected failure of any command is one ``Error:`` line (see
    :mod:`m3connect.cli_errors`); ``-v`` adds the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:
            show_traceback(ctx, exc)
            raise
        except Exception as exc:
            raise handle_failure(ctx, exc) from exc


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="m3connect")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More log output (-v info, -vv debug); tracebacks on errors.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """BGE-M3 dense, sparse and ColBERT vectors from one forward pass, in the databases you
    already run.

    \b
    No model weights at hand? Every --model option takes "random": a small random checkpoint
    with the BAAI/bge-m3 layout (the pipeline runs the same, the rankings mean nothing);
    `m3connect testing-checkpoint DIR` writes one into a folder.
      m3connect demo --model random
    """
    set_verbose(ctx, verbose)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        # Clients that log each failed attempt with its traceback before raising: the command
        # says it once, in one line.
        for name in ("elastic_transport", "httpx", "pymilvus"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # qdrant-client's version check warns before the request that then fails (or works).
        warnings.filterwarnings("ignore", message="Failed to obtain server version")


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------


def read_jsonl_texts(path: Path, text_field: str, id_field: str) -> tuple[list[DocId], list[str]]:
    """Ids and texts of a JSON Lines file; a record without ``id_field`` gets its line number
    (with one warning naming ``--id-field``).

    Reads (and checks) the whole file before anything is encoded, so a bad line 90,000 fails
    in a second, not after an hour of encoding. Raises :class:`click.ClickException` naming the
    file and line.
    """
    ids: list[DocId] = []
    texts: list[str] = []
    numbered = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise click.ClickException(
                        f"{where}: not valid JSON ({exc.msg}, column {exc.colno})"
                    ) from None
                if not isinstance(record, dict):
                    raise click.ClickException(
                        f"{where}: expected a JSON object, got {type(record).__name__}"
                    )
                if text_field not in record:
                    fields = ", ".join(sorted(record)) or "none"
                    raise click.ClickException(
                        f"{where}: no {text_field!r} field (fields: {fields}); choose one with --text-field"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise click.ClickException(
                        f"{where}: field {text_field!r} is a {type(text).__name__}, not a string"
                    )
                if id_field in record:
                    doc_id = record[id_field]
                else:
                    doc_id = lineno
                    numbered += 1
                    if numbered == 1:
                        logger.warning(
                            "%s has no id field %r: records without one get their line number "
                            "as id (name the id field with --id-field)",
                            where,
                            id_field,
                        )
                if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                    raise click.ClickException(
                        f"{where}: id field {id_field!r} must be a string or an integer, got {doc_id!r}"
                    )
                ids.append(doc_id)
                texts.append(text)
    except UnicodeDecodeError as exc:
        raise click.ClickException(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    return ids, texts


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class _JsonlWriter:
    """One JSON object per text: id, dense list, sparse {"token_id": weight}, colbert rows.

    Floats are written exactly (float32 values print as their shortest float64 form); use
    .npz for compact files.
    """

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    def write(self, ids: Sequence[DocId], out: M3Output) -> None:
        for row, doc_id in enumerate(ids):
            record: dict[str, Any] = {"id": doc_id}
            if out.dense is not None:
                record["dense"] = out.dense[row].tolist()
            if out.sparse is not None:
                record["sparse"] = sparse_to_string_keys(out.sparse[row])
            if out.colbert is not None:
                record["colbert"] = out.colbert[row].tolist()
            self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


class _NpzWriter:
    """Arrays in one .npz (no pickled objects, so ``np.load`` needs no ``allow_pickle``):

    - ``ids``: int64 when every id is an integer, else strings;
    - ``dense``: ``[n, d]`` float32;
    - ``sparse_indptr`` ``[n + 1]``, ``sparse_token_ids``, ``sparse_weights``: CSR rows, text
      ``i`` has ``sparse_token_ids[indptr[i]:indptr[i + 1]]``;
    - ``colbert_offsets`` ``[n + 1]`` and ``colbert_vectors`` ``[total_tokens, d]``: text
      ``i`` has rows ``offsets[i]:offsets[i + 1]``;
    - ``fingerprint``: the model's fingerprint as JSON.
    """

    def __init__(self, handle: IO[bytes], fingerprint_json: str) -> None:
        import numpy as np

        self.np = np
        self.handle = handle
        self.fingerprint_json = fingerprint_json
        self.ids: list[DocId] = []
        self.dense: list[Any] = []
        self.sparse: list[dict[int, float]] = []
        self.colbert: list[Any] = []

    def write(self, ids: Sequence[DocId], out: M3Output) -> None:
        self.ids.extend(ids)
        if out.dense is not None:
            self.dense.append(out.dense)
        if out.sparse is not None:
            self.sparse.extend(out.sparse)
        if out.colbert is not None:
            self.colbert.extend(out.colbert)

    def close(self) -> None:
        np = self.np
        arrays: dict[str, Any] = {"fingerprint": np.array(self.fingerprint_json)}
        if all(isinstance(i, int) for i in self.ids):
            arrays["ids"] = np.array(self.ids, dtype=np.int64)
        else:
            arrays["ids"] = np.array([str(i) for i in self.ids], dtype=str)
        if self.dense:
            arrays["dense"] = np.concatenate(self.dense)
        if self.sparse:
            sizes = [len(row) for row in self.sparse]
            arrays["sparse_indptr"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            arrays["sparse_token_ids"] = np.array(
                [t for row in self.sparse for t in row], dtype=np.int64
            )
            arrays["sparse_weights"] = np.array(
                [w for row in self.sparse for w in row.values()], dtype=np.float32
            )
        if self.colbert:
            sizes = [len(rows) for rows in self.colbert]
            arrays["colbert_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            arrays["colbert_vectors"] = np.concatenate(self.colbert)
        np.savez(self.handle, **arrays)


@main.command("encode")
@click.argument(
    "input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--model", default=DEFAULT_MODEL, show_default=True, help="Hub id or local checkpoint folder."
)
@click.option(
    "--text-field", default="text", show_default=True, help="JSON field holding the text."
)
@click.option(
    "--id-field",
    default="id",
    show_default=True,
    help="JSON field holding the document id; a record without it gets its line number.",
)
@click.option(
    "--max-length",
    type=click.IntRange(2),
    default=8192,
    show_default=True,
    help="Tokens per text, specials included; longer texts are truncated.",
)
@click.option(
    "--batch-tokens",
    type=click.IntRange(1),
    default=DEFAULT_BATCH_TOKENS,
    show_default=True,
    help="Padded tokens per forward pass.",
)
@click.option(
    "--max-batch-size", type=click.IntRange(1), default=None, help="Texts per forward pass at most."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype of the model body.",
)
@click.option("--device", default=None, help="torch device (default: cuda, then mps, then cpu).")
@click.option("--dense/--no-dense", default=True, show_default=True)
@click.option("--sparse/--no-sparse", default=True, show_default=True)
@click.option("--colbert/--no-colbert", default=True, show_default=True)
@click.option(
    "--colbert-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Texts encoded and written per step (bounds memory for .jsonl output).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr [default: on a terminal].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def encode_command(
    input_path: Path,
    output_path: Path,
    model: str,
    text_field: str,
    id_field: str,
    max_length: int,
    batch_tokens: int,
    max_batch_size: int | None,
    dtype: str,
    device: str | None,
    dense: bool,
    sparse: bool,
    colbert: bool,
    colbert_dtype: str,
    chunk_size: int,
    progress: bool | None,
    quiet: bool,
) -> None:
    """Encode the texts of a JSON Lines file INPUT into OUTPUT (.jsonl or .npz).

    Each .jsonl output line holds the id, "dense" (a list), "sparse" ({"token_id": weight},
    the form Elasticsearch's sparse_vector and FlagEmbedding use) and "colbert" (a list of
    rows). An .npz holds the same as arrays (ids, dense, CSR sparse, concatenated colbert
    rows with offsets, fingerprint).

    \b
    Example:
      m3connect testing-checkpoint ./tiny-m3
      m3connect encode docs.jsonl vectors.jsonl --model ./tiny-m3 --no-colbert
    """
    suffix = output_path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise click.BadParameter(
            f"{output_path} must end in {' or '.join(OUTPUT_FORMATS)}", param_hint="OUTPUT"
        )
    if not (dense or sparse or colbert):
        raise click.UsageError(
            "nothing to compute: --no-dense, --no-sparse and --no-colbert all given"
        )
    ids, texts = read_jsonl_texts(input_path, text_field, id_field)
    if not texts:
        raise click.ClickException(f"{input_path} holds no records")

    from tqdm.auto import tqdm

    from m3connect.cli_jobs import load_encoder, show_progress

    encoder = load_encoder(model, device, dtype)
    if max_length > encoder.max_length:
        raise click.BadParameter(
            f"{max_length} is more than the {encoder.max_length} tokens {model} allows",
            param_hint="--max-length",
        )

    # Written next to the target and renamed at the end: a failed run leaves no half file
    # that looks complete.
    partial = output_path.with_name(output_path.name + ".partial")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(texts), desc="encoding", unit="text", disable=not show_progress(progress, quiet)
    )
    try:
        with (
            partial.open("w", encoding="utf-8")
            if suffix == ".jsonl"
            else partial.open("wb") as handle
        ):
            writer: _JsonlWriter | _NpzWriter
            if suffix == ".jsonl":
                writer = _JsonlWriter(handle)  # type: ignore[arg-type]
            else:
                writer = _NpzWriter(handle, encoder.fingerprint.to_json())  # type: ignore[arg-type]
            for rows in _chunks(len(texts), chunk_size):
                out = encoder.encode(
                    texts[rows.start : rows.stop],
                    dense=dense,
                    sparse=sparse,
                    colbert=colbert,
                    max_length=max_length,
                    batch_tokens=batch_tokens,
                    max_batch_size=max_batch_size,
                    colbert_dtype=colbert_dtype,
                    progress_callback=bar.update,
                )
                writer.write(ids[rows.start : rows.stop], out)
            writer.close()
        os.replace(partial, output_path)
    finally:
        bar.close()
        if partial.exists():
            partial.unlink()
    click.echo(f"wrote {len(texts)} texts to {output_path}", err=True)


# --------------------------------------------------------------------------------------------
# testing-checkpoint
# --------------------------------------------------------------------------------------------


@main.command("testing-checkpoint")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--hidden-size", type=click.IntRange(4), default=32, show_default=True)
@click.option("--layers", "num_hidden_layers", type=click.IntRange(1), default=2, show_default=True)
@click.option(
    "--heads", "num_attention_heads", type=click.IntRange(1), default=4, show_default=True
)
@click.option("--intermediate-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into PATH even if it holds files.")
def testing_checkpoint_command(
    path: Path,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    seed: int,
    overwrite: bool,
) -> None:
    """Write a tiny RANDOM checkpoint with the BAAI/bge-m3 file layout into PATH.

    Its vectors mean nothing, but every m3connect command runs on it: try the pipeline
    without downloading the real 2.3 GB model.
    """
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise click.ClickException(f"{path} is not empty; choose a new folder or pass --overwrite")
    from m3connect.testing import build_random_checkpoint

    try:
        build_random_checkpoint(
            path,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            seed=seed,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote a random BGE-M3-layout checkpoint to {path} (vectors are meaningless)")
    click.echo(f"try: m3connect encode docs.jsonl vectors.jsonl --model {path}")


# index / search / eval / demo: indexing jobs (m3connect.cli_jobs imports only click at load).
from m3connect.cli_jobs import demo_command, eval_command, index_command, search_command  # noqa: E402

main.add_command(index_command)
main.add_command(search_command)
main.add_command(eval_command)
main.add_command(demo_command)

# finetune: m3connect.finetune.cli imports only click at load.
from m3connect.finetune.cli import finetune_command  # noqa: E402

main.add_command(finetune_command)
