"""``m3connect finetune``: the command over :class:`m3connect.finetune.Trainer`.

Imports only click at load time (``m3connect --help`` stays instant)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["finetune_command"]


def _parts(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in parts if p not in ("dense", "sparse", "colbert")]
    if unknown or not parts:
        raise click.BadParameter(
            f"a comma-separated subset of dense,sparse,colbert, got {value!r}", param_hint="--parts"
        )
    return parts


@click.command("finetune")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="Base checkpoint: hub id or local folder.")
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the fine-tuned checkpoint (BGE-M3 layout), its log and checkpoints.",
)
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--lr",
    "learning_rate",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-5,
    show_default=True,
)
@click.option(
    "--warmup-ratio",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Fraction of the steps with a linear warmup; then linear decay to 0.",
)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.01, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Queries per batch at most.",
)
@click.option(
    "--batch-tokens",
    type=click.IntRange(0),
    default=65536,
    show_default=True,
    help="Padded passage tokens per batch: short length buckets get larger batches (up to "
    "--batch-size). 0: --batch-size everywhere.",
)
@click.option(
    "--group-size",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="1 positive + negatives per query.",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True
)
@click.option("--query-max-len", type=click.IntRange(2), default=512, show_default=True)
@click.option("--passage-max-len", type=click.IntRange(2), default=2048, show_default=True)
@click.option(
    "--parts",
    default="dense,sparse,colbert",
    show_default=True,
    help="Outputs to train. All three: the unified loss with self-distillation; a subset: the "
    "mean of their losses (the other heads stay as they are).",
)
@click.option("--in-batch-negatives/--group-negatives-only", default=True, show_default=True)
@click.option("--self-distill/--no-self-distill", default=True, show_default=True)
@click.option("--self-distill-start-step", type=int, default=-1, show_default=True)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations: less memory, ~30% slower.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bf16", "fp16"]),
    default="float32",
    show_default=True,
    help="bf16/fp16: autocast on a GPU (the heads stay float32). CPU trains in float32.",
)
@click.option(
    "--device", default=None, help="torch device [default: cuda (the local rank's), else cpu]."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--save-steps",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="A checkpoint every N steps (0: each epoch).",
)
@click.option("--keep-checkpoints", type=click.IntRange(1), default=2, show_default=True)
@click.option("--log-steps", type=click.IntRange(1), default=10, show_default=True)
@click.option(
    "--on-error",
    type=click.Choice(["skip", "stop"]),
    default="stop",
    show_default=True,
    help="A bad line (invalid JSON, empty pos, ...): report it and skip it, or stop.",
)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --output.")
@click.option(
    "--overwrite", is_flag=True, help="Write into --output even if it holds something else."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def finetune_command(
    data: Path,
    model: str,
    output: Path,
    parts: str,
    batch_tokens: int,
    resume: bool,
    overwrite: bool,
    progress: bool,
    **options: object,
) -> None:
    """Fine-tune a BGE-M3 checkpoint on DATA (FlagEmbedding's JSONL: {"query", "pos": [...],
    "neg": [...]}, optional "pos_scores"/"neg_scores") with the paper's unified loss and
    self-knowledge distillation; write a checkpoint every m3connect command (and FlagEmbedding)
    loads.

    \b
    Example:
      m3connect finetune train.jsonl --model BAAI/bge-m3 --output ./m3-mine --epochs 2
      torchrun --nproc-per-node 4 -m m3connect finetune train.jsonl --model BAAI/bge-m3 --output ./m3-mine
      m3connect index docs.jsonl --model ./m3-mine --store qdrant:./mine.qdrant
    """
    from transformers.utils import logging as transformers_logging

    from m3connect.encoder import CheckpointError
    from m3connect.finetune.data import TrainingDataError
    from m3connect.finetune.trainer import FinetuneError, Trainer, TrainingConfig

    try:
        config = TrainingConfig(
            data=str(data),
            model=model,
            output=str(output),
            parts=_parts(parts),
            batch_tokens=batch_tokens or None,
            **options,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    # Our own progress bar; transformers' loading and saving bars are noise here.
    transformers_logging.disable_progress_bar()
    try:
        result = Trainer(config, resume=resume, overwrite=overwrite, progress=progress).train()
    except (FinetuneError, TrainingDataError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    losses = ", ".join(
        f"{k} {v:.4f}" for k, v in result.last_losses.items() if not k.startswith("distill")
    )
    click.echo(
        f"fine-tuned {model} for {result.steps} steps in {result.seconds:.0f} s ({losses}); "
        f"wrote {output}",
        err=True,
    )
    if result.skipped_records:
        click.echo(
            f"{result.skipped_records} bad records skipped (see {output / 'train.log'})", err=True
        )
