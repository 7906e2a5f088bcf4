"""The fine-tuning loop: epochs of length-grouped batches, AdamW with warmup and linear decay,
checkpoints and resume, DDP under ``torchrun``, a BGE-M3 checkpoint as output.

    from m3connect.finetune import Trainer, TrainingConfig
    Trainer(TrainingConfig(data="train.jsonl", model="BAAI/bge-m3", output="./m3-mine")).train()

Output folder layout when training ends: ``config.json``, ``model.safetensors``,
``colbert_linear.pt``, ``sparse_linear.pt`` (float32 state dicts), the tokenizer files (what
:meth:`M3Encoder.from_pretrained` and FlagEmbedding's ``BGEM3FlagModel`` load), plus
``m3connect-finetune.json`` (the run's settings and progress), ``train.log`` and, during the
run, ``checkpoints/step-N/trainer_state.pt``.

Resume: the batch plan of an epoch and each query's group depend only on the seed, the epoch
and the example, and a checkpoint holds the weights, the optimizer, the schedule and the random
states, so a resumed run takes exactly the steps the interrupted one would have taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m3connect.batching import is_out_of_memory
from m3connect.finetune.data import TrainingData, read_training_data, sample_group
from m3connect.finetune.loss import DEFAULT_TEMPERATURE, PARTS, M3TrainModel, unified_loss
from m3connect.finetune.sampler import LengthGroupedSampler

__all__ = ["TrainingConfig", "TrainingResult", "Trainer", "FinetuneError", "STATE_FILE"]

logger = logging.getLogger(__name__)

#: Marks a folder as the output of a fine-tuning run; holds the run's settings.
STATE_FILE = "m3connect-finetune.json"
LOG_FILE = "train.log"
CHECKPOINTS = "checkpoints"
_AMP = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Settings that may change between an interrupted run and its resume without changing the
# result.
_RESUMABLE = {"save_steps", "keep_checkpoints", "log_steps", "on_error", "device"}


class FinetuneError(RuntimeError):
    """A fine-tuning run cannot start or go on; the message says why and what to do."""


@dataclass
class TrainingConfig:
    """Settings of a fine-tuning run (the command line's options)."""

    data: str
    model: str
    output: str
    epochs: int = 1
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int = 8
    #: Padded passage tokens per batch (queries x group_size x bucket length); shorter
    #: buckets get larger batches, up to batch_size. None: batch_size everywhere.
    batch_tokens: int | None = 65536
    group_size: int = 8
    temperature: float = DEFAULT_TEMPERATURE
    query_max_len: int = 512
    passage_max_len: int = 2048
    parts: tuple[str, ...] = PARTS
    in_batch_negatives: bool = True
    self_distill: bool = True
    #: Self-distillation from the step after this one on (-1: from the first step).
    self_distill_start_step: int = -1
    gradient_checkpointing: bool = False
    #: "float32", or "bfloat16"/"float16" autocast (GPU only).
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0
    #: A checkpoint every this many steps (0: at the end of each epoch only).
    save_steps: int = 0
    keep_checkpoints: int = 2
    log_steps: int = 10
    on_error: str = "stop"

    def __post_init__(self) -> None:
        self.parts = tuple(p for p in PARTS if p in set(self.parts))
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.group_size >= 1, "group_size must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (bool(self.parts), "parts must name at least one of dense, sparse, colbert"),
            (self.dtype in ("float32", "fp32", *_AMP), f"unknown dtype {self.dtype!r}"),
            (self.on_error in ("skip", "stop"), "on_error must be 'skip' or 'stop'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["parts"] = list(self.parts)
        return out


@dataclass
class TrainingResult:
    output: Path
    steps: int
    epochs: int
    #: Mean of each loss term over the last logging window.
    last_losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    skipped_records: int = 0


def _world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


class Trainer:
    """One fine-tuning run. ``resume``: continue from the last checkpoint in the output folder.
    ``overwrite``: write into an output folder that holds something else (or another run).
    ``on_step(step, losses)`` is called after each optimizer step (for tests and notebooks)."""

    def __init__(
        self,
        config: TrainingConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.on_step = on_step
        self.output = Path(config.output)
        self.rank, self.local_rank, self.world_size = _world()
        #: Queries per forward pass after an out-of-memory split (None: the whole batch).
        self.max_micro_batch: int | None = None

    # -- output folder ---------------------------------------------------------------------

    def _check_output(self) -> dict[str, Any] | None:
        """Refuse a folder that is not this run's; the saved state when resuming."""
        state_path = self.output / STATE_FILE
        if not self.output.exists() or not any(self.output.iterdir()):
            if self.resume:
                raise FinetuneError(f"--resume: {self.output} holds no checkpoint to resume from")
            return None
        if self.overwrite:
            if self.resume:
                raise FinetuneError("--resume and --overwrite exclude each other")
            return None
        if not state_path.is_file():
            raise FinetuneError(
                f"{self.output} exists and is not the output of an m3connect finetune run (no "
                f"{STATE_FILE}); choose a new folder or pass --overwrite to write into it"
            )
        state = json.loads(state_path.read_text(encoding="utf-8"))
        saved = state.get("config", {})
        mine = self.config.to_json()
        differ = sorted(k for k in mine if k not in _RESUMABLE and saved.get(k) != mine[k])
        if differ:
            raise FinetuneError(
                f"{self.output} holds another run (different {', '.join(differ)}: "
                f"{', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); choose a new folder "
                f"or pass --overwrite"
            )
        if state.get("finished"):
            raise FinetuneError(
                f"{self.output} holds a finished run of these settings; pass --overwrite to "
                f"train it again"
            )
        if not self.resume:
            raise FinetuneError(
                f"{self.output} holds checkpoints of this run; pass --resume to continue it or "
                f"--overwrite to start over"
            )
        return state

    def _write_state(self, **fields: Any) -> None:
        if self.rank != 0:
            return
        state = {"config": self.config.to_json(), "finished": False, **fields}
        tmp = self.output / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.output / STATE_FILE)

    def _last_checkpoint(self) -> Path | None:
        folder = self.output / CHECKPOINTS
        found = (
            [p for p in folder.glob("step-*") if (p / "trainer_state.pt").is_file()]
            if folder.is_dir()
            else []
        )
        return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)

    # -- the run ---------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        started = time.perf_counter()
        distributed = self.world_size > 1
        if distributed and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        try:
            return self._train(started)
        finally:
            if distributed and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def _device(self) -> torch.device:
        if self.config.device:
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _train(self, started: float) -> TrainingResult:
        cfg = self.config
        saved_state = self._check_output()
        if self.world_size > 1:
            torch.distributed.barrier()
        device = self._device()
        amp_dtype = _AMP.get(cfg.dtype)
        if amp_dtype is not None and device.type != "cuda":
            raise FinetuneError(
                f"--dtype {cfg.dtype} is autocast on a GPU; on {device.type} training runs in "
                f"float32 (--dtype float32)"
            )
        if self.rank == 0:
            if self.overwrite and (self.output / CHECKPOINTS).is_dir():
                shutil.rmtree(self.output / CHECKPOINTS)
            self.output.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger("m3connect")
        level = root.level
        log_handler = self._open_log()
        try:
            data = read_training_data(cfg.data, group_size=cfg.group_size, on_error=cfg.on_error)  # type: ignore[arg-type]
            return self._run(data, device, amp_dtype, saved_state, started)
        finally:
            if log_handler is not None:
                root.removeHandler(log_handler)
                root.setLevel(level)
                log_handler.close()

    def _open_log(self) -> logging.Handler | None:
        if self.rank != 0:
            return None
        handler = logging.FileHandler(self.output / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("m3connect")
        root.addHandler(handler)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        return handler

    def _load_model(self, device: torch.device) -> M3TrainModel:
        from m3connect.encoder import M3Encoder

        encoder = M3Encoder.from_pretrained(self.config.model, device=device, dtype="float32")
        model = M3TrainModel.from_encoder(encoder)
        model.requires_grad_(True)
        # The pooler is in the checkpoint but no output uses it (DDP needs every trained
        # parameter to get a gradient).
        pooler = getattr(model.model, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)
        if "colbert" not in self.config.parts:
            model.colbert_linear.requires_grad_(False)
        if "sparse" not in self.config.parts:
            model.sparse_linear.requires_grad_(False)
        if self.config.gradient_checkpointing:
            _checkpointing(model.model, True)
        return model.train()

    def _lengths(self, model: M3TrainModel, data: TrainingData) -> list[int]:
        """Each example's padded passage length: its longest passage (within the limit)."""
        cfg = self.config
        texts = sorted({t for e in data.examples for t in (*e.pos, *e.neg)})
        counts = model.tokenizer(
            texts,
            add_special_tokens=True,
            truncation=True,
            max_length=cfg.passage_max_len,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        length = {t: len(ids) for t, ids in zip(texts, counts, strict=True)}
        return [max(length[t] for t in (*e.pos, *e.neg)) for e in data.examples]

    def _run(
        self,
        data: TrainingData,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        saved_state: dict[str, Any] | None,
        started: float,
    ) -> TrainingResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = self._load_model(device)
        sampler = LengthGroupedSampler(
            self._lengths(model, data),
            cfg.batch_size,
            batch_tokens=cfg.batch_tokens,
            tokens_per_length=cfg.group_size,
            seed=cfg.seed,
        )
        steps_per_epoch = sampler.steps_per_epoch(self.world_size)
        if steps_per_epoch == 0:
            raise FinetuneError(
                f"{len(data.examples)} examples make fewer batches than the {self.world_size} "
                f"processes; add data or lower --batch-size"
            )
        total_steps = steps_per_epoch * cfg.epochs
        trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.learning_rate,
        )
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * total_steps), total_steps
        )
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        step = 0
        checkpoint = self._last_checkpoint() if saved_state is not None else None
        if saved_state is not None and checkpoint is None:
            raise FinetuneError(
                f"--resume: {self.output} has no checkpoint yet (the run stopped before its "
                f"first one); start again with --overwrite"
            )
        if checkpoint is not None:
            step = self._load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, device)
            logger.info("resuming from %s (step %d of %d)", checkpoint, step, total_steps)
        else:
            self._write_state(steps=0, total_steps=total_steps)
        forward: torch.nn.Module = model
        if self.world_size > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        logger.info(
            "fine-tuning %s on %d examples (%d skipped): %d epochs x %d steps, group %d, "
            "parts %s, %d process(es), %s",
            cfg.model,
            len(data.examples),
            len(data.errors),
            cfg.epochs,
            steps_per_epoch,
            cfg.group_size,
            "+".join(cfg.parts),
            self.world_size,
            device,
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=step,
            desc="fine-tuning",
            unit="step",
            disable=not self.progress or self.rank != 0,
        )
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        plan_epoch, plan = -1, []
        try:
            while step < total_steps:
                epoch, index = divmod(step, steps_per_epoch)
                if epoch != plan_epoch:
                    plan_epoch, plan = epoch, sampler.shard(epoch, self.rank, self.world_size)
                batch = plan[index]
                distill = cfg.self_distill and step > cfg.self_distill_start_step
                losses = self._step(forward, model, data, batch, epoch, distill, amp_dtype, scaler)
                if cfg.max_grad_norm > 0:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append(losses)
                window = window[-max(1, cfg.log_steps) :]
                last = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
                bar.update(1)
                bar.set_postfix(
                    {k: f"{v:.3f}" for k, v in last.items() if not k.startswith("distill")}
                )
                if step % max(1, cfg.log_steps) == 0 or step == total_steps:
                    logger.info(
                        "step %d/%d epoch %d lr %.3g %s",
                        step,
                        total_steps,
                        epoch + 1,
                        scheduler.get_last_lr()[0],
                        " ".join(f"{k} {v:.4f}" for k, v in last.items()),
                    )
                end_of_epoch = step % steps_per_epoch == 0
                if step < total_steps and (
                    (cfg.save_steps and step % cfg.save_steps == 0) or end_of_epoch
                ):
                    self._save_checkpoint(step, total_steps, model, optimizer, scheduler, scaler)
                if self.on_step is not None:
                    self.on_step(step, losses)
        finally:
            bar.close()
        if self.world_size > 1:
            torch.distributed.barrier()
        if self.rank == 0:
            self._save_model(model)
            self._write_state(steps=step, total_steps=total_steps, finished=True, losses=last)
            if (self.output / CHECKPOINTS).is_dir():
                shutil.rmtree(self.output / CHECKPOINTS)
            logger.info("saved the fine-tuned model to %s", self.output)
        return TrainingResult(
            self.output, step, cfg.epochs, last, time.perf_counter() - started, len(data.errors)
        )

    # -- one step --------------------------------------------------------------------------

    def _step(
        self,
        forward: torch.nn.Module,
        model: M3TrainModel,
        data: TrainingData,
        batch: Sequence[int],
        epoch: int,
        distill: bool,
        amp_dtype: torch.dtype | None,
        scaler: Any,
    ) -> dict[str, float]:
        """Gradients of one batch, in micro-batches when an earlier one ran out of memory
        (each micro-batch is scored against its own passages). Under DDP every process must
        split alike: an out-of-memory error in one process only is not recovered (the others
        wait for its gradients); lower --batch-size or --batch-tokens instead."""
        cfg = self.config
        groups = [sample_group(data.examples[i], cfg.group_size, cfg.seed, epoch, i) for i in batch]
        while True:
            size = min(len(batch), self.max_micro_batch or len(batch))
            pieces = [range(s, min(s + size, len(batch))) for s in range(0, len(batch), size)]
            try:
                totals: dict[str, float] = {}
                for n, piece in enumerate(pieces):
                    queries = [data.examples[batch[i]].query for i in piece]
                    passages = [p for i in piece for p in groups[i][0]]
                    teacher = [groups[i][1] for i in piece] if data.has_teacher_scores else None
                    sync = n == len(pieces) - 1 or not isinstance(
                        forward, torch.nn.parallel.DistributedDataParallel
                    )
                    with (
                        forward.no_sync() if not sync else contextlib.nullcontext(),
                        torch.autocast(
                            device_type=model.model.device.type,
                            dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None,
                        ),
                    ):
                        result = unified_loss(
                            forward,
                            queries,
                            passages,
                            group_size=cfg.group_size,
                            temperature=cfg.temperature,
                            in_batch_negatives=cfg.in_batch_negatives,
                            self_distill=distill,
                            teacher_scores=teacher,
                            parts=cfg.parts,
                            query_max_len=cfg.query_max_len,
                            passage_max_len=cfg.passage_max_len,
                        )
                    weight = len(piece) / len(batch)
                    loss = result.total * weight
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    for k, v in result.as_floats().items():
                        totals[k] = totals.get(k, 0.0) + v * weight
                return totals
            except Exception as exc:
                if not is_out_of_memory(exc) or size == 1:
                    raise
                for p in model.parameters():
                    p.grad = None
                self.max_micro_batch = max(1, size // 2)
                if model.model.device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning(
                    "out of memory on a batch of %d queries; halving it to %d queries per "
                    "forward pass from now on (fewer in-batch negatives per pass)",
                    size,
                    self.max_micro_batch,
                )

    # -- checkpoints and output ------------------------------------------------------------

    def _save_checkpoint(
        self,
        step: int,
        total: int,
        model: M3TrainModel,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
    ) -> None:
        if self.rank != 0:
            return
        folder = self.output / CHECKPOINTS / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "max_micro_batch": self.max_micro_batch,
        }
        tmp = folder / "trainer_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, folder / "trainer_state.pt")
        self._write_state(steps=step, total_steps=total, checkpoint=str(folder.name))
        done = sorted(
            (p for p in (self.output / CHECKPOINTS).glob("step-*") if p != folder),
            key=lambda p: int(p.name.split("-")[1]),
        )
        for old in done[: max(0, len(done) - max(0, self.config.keep_checkpoints - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", folder)

    def _load_checkpoint(
        self,
        folder: Path,
        model: M3TrainModel,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        device: torch.device,
    ) -> int:
        # weights_only: tensors, numbers and plain containers only, never arbitrary objects.
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.max_micro_batch = state.get("max_micro_batch")
        return int(state["step"])

    def _save_model(self, model: M3TrainModel) -> None:
        """The BGE-M3 layout: body, both heads as float32 state dicts, tokenizer."""
        body = model.model
        if self.config.gradient_checkpointing:
            _checkpointing(body, False)
        body.save_pretrained(self.output, safe_serialization=True)
        for name, head in (
            ("colbert_linear.pt", model.colbert_linear),
            ("sparse_linear.pt", model.sparse_linear),
        ):
            torch.save(
                {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                self.output / name,
            )
        model.tokenizer.save_pretrained(self.output)


def _checkpointing(body: Any, enable: bool) -> None:
    """Activation (gradient) checkpointing on or off, under transformers 5's name where it has
    one. Non-reentrant: the recomputation restores the dropout RNG and works under DDP."""
    if hasattr(body, "activation_checkpointing_enable"):
        if enable:
            body.activation_checkpointing_enable({"use_reentrant": False})
        else:
            body.activation_checkpointing_disable()
    elif enable:
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        body.gradient_checkpointing_disable()
