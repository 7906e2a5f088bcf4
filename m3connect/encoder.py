"""Load a BGE-M3 checkpoint and compute dense, sparse and ColBERT vectors in one forward pass.

The math (see ``M3-REFERENCE.md``), for the last hidden states ``H`` of one text:

- dense: ``normalize(H[0])``;
- sparse: ``relu(sparse_linear(H[t]))`` per token, without ``<s>``, ``</s>``, ``<pad>`` and
  ``<unk>``, weights > 0 only, a repeated token keeping its largest weight;
- ColBERT: ``normalize(colbert_linear(H[1:]))`` over the real tokens (``</s>`` included).

Precision: the body runs in the ``dtype`` asked for (float32, float16 or bfloat16); the two
heads always run in float32 on the upcast hidden states. They are one or two matrix products
per token against the body's dozens, and float32 keeps the L2 normalisation and the
``relu > 0`` threshold of the sparse weights as exact as the body allows. Outputs are float32
(ColBERT optionally float16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3connect.batching import DEFAULT_BATCH_TOKENS, OOMSplitter, plan_batches
from m3connect.fingerprint import ModelFingerprint, weights_sha256
from m3connect.types import M3Embedding, M3Output, SparseWeights

__all__ = ["CheckpointError", "M3Encoder", "DEFAULT_MODEL", "DEFAULT_BATCH_TOKENS"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "BAAI/bge-m3"

HEAD_FILES = {"colbert": "colbert_linear.pt", "sparse": "sparse_linear.pt"}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
)
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class CheckpointError(OSError):
    """A checkpoint cannot be used: not found, not reachable, incomplete or malformed.

    The message names the model or file and says what to do. A subclass of :class:`OSError`,
    like the errors transformers raises for a missing model.
    """


# --------------------------------------------------------------------------------------------
# Finding the checkpoint folder
# --------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment is read again here
    # so that setting it later in the process (a notebook, a test) is honoured too.
    from huggingface_hub import constants

    return bool(
        getattr(constants, "HF_HUB_OFFLINE", False)
        or _env_true("HF_HUB_OFFLINE")
        or _env_true("TRANSFORMERS_OFFLINE")
    )


def _download_hint(repo_id: str) -> str:
    local = "./" + repo_id.rsplit("/", 1)[-1]
    return (
        f"Download it on a machine with internet access, e.g. "
        f"`huggingface-cli download {repo_id} --local-dir {local}` (or `hf download {repo_id} "
        f"--local-dir {local}`), copy the folder here and pass the local folder path "
        f"(M3Encoder.from_pretrained({local!r}), or `--model {local}` on the command line). "
        f"Alternatively set HF_HOME to a Hugging Face cache that already holds it and "
        f"HF_HUB_OFFLINE=1 so that the network is not tried. To try the pipeline without the "
        f"weights, use the model name 'random' (a small random checkpoint with the same "
        f"layout; `m3connect testing-checkpoint DIR` writes one into a folder)."
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
    )


def _check_folder(folder: Path, shown_name: str) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` has the BGE-M3 layout."""
    layout = (
        "a BGE-M3 checkpoint folder holds config.json, model.safetensors (or pytorch_model.bin), "
        "the tokenizer files (tokenizer.json, ...), colbert_linear.pt and sparse_linear.pt, "
        "like BAAI/bge-m3"
    )
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{shown_name} is not a model checkpoint: no config.json in {folder} ({layout})"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise CheckpointError(
            f"{shown_name} is not a complete checkpoint: no model weights "
            f"({' / '.join(_WEIGHT_FILES)}) in {folder} ({layout})"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{shown_name} is not a complete checkpoint: no tokenizer files in {folder} ({layout})"
        )
    for kind, filename in HEAD_FILES.items():
        if not (folder / filename).is_file():
            raise CheckpointError(
                f"{shown_name} has no {filename} (the {kind} head of BGE-M3) in {folder}. "
                f"Without it the {kind} vectors would come from a random head (FlagEmbedding "
                f"silently initialises one), so m3connect refuses to load. Copy {filename} from "
                f"BAAI/bge-m3 (or from the checkpoint this model was fine-tuned from) into the folder."
            )


def _hub_errors() -> tuple[type[BaseException], type[BaseException]]:
    try:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # huggingface_hub < 0.21 kept them in utils
        from huggingface_hub.utils import (  # type: ignore[no-redef]
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    return RepositoryNotFoundError, RevisionNotFoundError


def _list_hub_files(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    """The files of a hub repository; raises on any network or hub error.

    One plain API request without retries: when the hub is unreachable this fails in well under
    a second instead of going through the download helpers' exponential back-off.
    """
    from huggingface_hub import HfApi

    return list(HfApi(token=token).list_repo_files(repo_id, revision=revision))


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (no DNS, no route, refused), or None when a TCP connection
    opens. One attempt: huggingface_hub's own requests retry with back-off for half a minute
    before an offline machine gets its answer. Behind a proxy the direct probe proves nothing,
    so it is skipped."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    if not endpoint.hostname:
        return None
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _hub_allow_patterns(files: Sequence[str], repo_id: str) -> list[str]:
    """Which files of the repository to download: config, tokenizer, heads, one weights format."""
    present = set(files)
    if "config.json" not in present:
        raise CheckpointError(
            f"{repo_id} on the Hugging Face Hub is not a model checkpoint: no config.json"
        )
    for kind, filename in HEAD_FILES.items():
        if filename not in present:
            raise CheckpointError(
                f"{repo_id} on the Hugging Face Hub has no {filename} (the {kind} head of BGE-M3); "
                f"m3connect refuses to use a random head. Use BAAI/bge-m3 or a checkpoint that "
                f"ships both colbert_linear.pt and sparse_linear.pt."
            )
    patterns = ["config.json", *HEAD_FILES.values(), *(f for f in _TOKENIZER_FILES if f in present)]
    # One weights format only: the hub repo of bge-m3 is 2.3 GB per format.
    if "model.safetensors" in present:
        patterns.append("model.safetensors")
    elif "model.safetensors.index.json" in present:
        patterns += ["model.safetensors.index.json", "model-*.safetensors"]
    elif "pytorch_model.bin" in present:
        patterns.append("pytorch_model.bin")
    elif "pytorch_model.bin.index.json" in present:
        patterns += ["pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    else:
        raise CheckpointError(
            f"{repo_id} on the Hugging Face Hub has no model weights ({' / '.join(_WEIGHT_FILES)})"
        )
    return patterns


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a checkpoint given as a folder path or a hub id (downloading it if
    needed and possible). Raises :class:`CheckpointError` with what to do otherwise."""
    name = os.fspath(name_or_path)
    if name == "random":  # m3connect.testing.RANDOM_MODEL: the small random checkpoint
        from m3connect.testing import random_checkpoint

        return random_checkpoint()
    folder = Path(name).expanduser()
    if folder.is_dir():
        _check_folder(folder, repr(name))
        return folder
    if folder.exists():
        raise CheckpointError(f"{name!r} is a file; pass the checkpoint folder that contains it")
    if _looks_like_path(name):
        raise CheckpointError(
            f"no folder {name!r} (resolved to {folder.resolve()}); pass the path of a local "
            f"checkpoint folder or a Hugging Face Hub id such as {DEFAULT_MODEL!r}"
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError as exc:
        raise CheckpointError(
            f"{name!r} is neither an existing folder nor a valid Hugging Face Hub id ({exc})"
        ) from None

    repo_not_found, revision_not_found = _hub_errors()
    offline = local_files_only or _hub_offline()
    reason = "offline mode (HF_HUB_OFFLINE or local_files_only)" if offline else ""
    if not offline:
        unreachable = _hub_unreachable()
        if unreachable:
            reason = f"the Hugging Face Hub is not reachable: {unreachable}"
            logger.warning("%s; looking for %s in the local cache", reason, name)
            offline = True
    if not offline:
        try:
            files = _list_hub_files(name, revision, token)
        except revision_not_found as exc:
            raise CheckpointError(
                f"{name!r} has no revision {revision!r} on the Hugging Face Hub: {exc}"
            ) from None
        except repo_not_found as exc:
            raise CheckpointError(
                f"{name!r} was not found on the Hugging Face Hub (a private or gated repository "
                f"needs a token: `hf auth login` or token=...). A local folder must exist "
                f"as given. ({type(exc).__name__})"
            ) from None
        except Exception as exc:  # connection refused, DNS, proxy, timeout: all mean "no hub"
            reason = f"the Hugging Face Hub is not reachable: {type(exc).__name__}: {exc}"
            logger.warning("%s; looking for %s in the local cache", reason, name)
            offline = True
        else:
            try:
                return Path(
                    snapshot_download(
                        name,
                        revision=revision,
                        cache_dir=cache_dir,
                        token=token,
                        allow_patterns=_hub_allow_patterns(files, name),
                    )
                )
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(
                    f"downloading {name!r} from the Hugging Face Hub failed: {type(exc).__name__}: "
                    f"{exc}. {_download_hint(name)}"
                ) from exc
    try:
        cached = Path(
            snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True)
        )
    except Exception as exc:
        raise CheckpointError(
            f"cannot load {name!r}: there is no local folder of that name, {reason}, and it is "
            f"not in the local Hugging Face cache "
            f"({cache_dir or os.environ.get('HF_HOME') or '~/.cache/huggingface'}). "
            f"{_download_hint(name)} ({type(exc).__name__})"
        ) from None
    _check_folder(cached, f"{name!r} (cached copy)")
    return cached


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


def _load_head(path: Path, kind: str, hidden_size: int) -> dict[str, torch.Tensor]:
    """A ``Linear`` state_dict from ``path``; only tensors are unpickled (weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a plain state_dict of tensors: torch.load(weights_only=True) refused "
            f"it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). m3connect "
            f"never unpickles arbitrary objects from a head file; re-save the {kind} head with "
            f"torch.save(linear.state_dict(), ...)."
        ) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state_dict of the {kind} head"
        )
    prefix = Path(path).stem + "."  # tolerate keys saved as "colbert_linear.weight"
    state = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
    weight, bias = state.get("weight"), state.get("bias")
    if (
        set(state) != {"weight", "bias"}
        or not isinstance(weight, torch.Tensor)
        or not isinstance(bias, torch.Tensor)
        or weight.ndim != 2
        or weight.shape[1] != hidden_size
        or bias.shape != (weight.shape[0],)
        or (kind == "sparse" and weight.shape[0] != 1)
    ):
        shapes = {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            for k, v in state.items()
        }
        expected = "[1, hidden]" if kind == "sparse" else "[dim, hidden]"
        raise CheckpointError(
            f"{path} is not the {kind} head of this model: expected a Linear state_dict with "
            f"weight {expected} (hidden = {hidden_size}) and bias, found {shapes}"
        )
    return {"weight": weight, "bias": bias}


def _body_files(folder: Path) -> list[Path]:
    """The files holding a checkpoint's body weights (what transformers loads)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("pytorch_model*.bin"))


def _heads_sha256(heads: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over the heads as stored: per head (colbert, sparse), per key (sorted), the
    name, dtype and shape, then the raw bytes. Independent of the compute dtype and device."""
    digest = hashlib.sha256()
    for kind in sorted(heads):
        for key in sorted(heads[kind]):
            tensor = heads[kind][key].detach().cpu().contiguous()
            digest.update(
                f"{HEAD_FILES[kind]}:{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode()
            )
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _linear(state: Mapping[str, torch.Tensor], device: torch.device) -> torch.nn.Linear:
    out_features, in_features = state["weight"].shape
    layer = torch.nn.Linear(in_features, out_features, device=device, dtype=torch.float32)
    layer.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return layer.eval().requires_grad_(False)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"dtype must be one of float32, float16, bfloat16, got {dtype!r}"
        ) from None


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _transformers_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    # transformers 4.56 renamed torch_dtype= to dtype= (and 5.x warns about the old name).
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


class M3Encoder:
    """BGE-M3 (or a checkpoint of the same layout): one forward pass per batch gives the
    dense, sparse and ColBERT vectors of every text.

    Build it with :meth:`from_pretrained`. The constructor takes already-loaded parts, for a
    model fine-tuned in the same process; ``body_sha256`` is the body's
    :func:`~m3connect.fingerprint.weights_sha256` when known ("" otherwise: the fingerprint
    then identifies the body only by the heads and dimensions).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        colbert_state: Mapping[str, torch.Tensor],
        sparse_state: Mapping[str, torch.Tensor],
        *,
        name: str,
        device: torch.device | str | None = None,
        body_sha256: str = "",
    ) -> None:
        self._body_sha256 = body_sha256
        self._device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self._model = model.to(self._device).eval()
        self._model.requires_grad_(False)
        self._tokenizer = tokenizer
        self._name = name
        config = model.config
        hidden = int(config.hidden_size)
        self._colbert = _linear(colbert_state, self._device)
        self._sparse = _linear(sparse_state, self._device)
        if self._colbert.in_features != hidden or self._sparse.in_features != hidden:
            raise CheckpointError(
                f"{name}: the heads take {self._colbert.in_features}/{self._sparse.in_features} "
                f"inputs but the model's hidden size is {hidden}"
            )
        self._heads_sha256 = _heads_sha256({"colbert": colbert_state, "sparse": sparse_state})
        self._pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        )
        # The reference drops exactly these four from the lexical weights.
        special = {
            tokenizer.cls_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.unk_token_id,
        }
        self._special_ids = np.array(sorted(i for i in special if i is not None), dtype=np.int64)
        positions = int(getattr(config, "max_position_embeddings", 512))
        if getattr(config, "model_type", "") in {
            "xlm-roberta",
            "xlm-roberta-xl",
            "roberta",
            "camembert",
        }:
            # RoBERTa numbers positions from padding_idx + 1: 8194 positions hold 8192 tokens.
            positions -= int(config.pad_token_id) + 1
        self._max_length = positions

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: torch.device | str | None = None,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> M3Encoder:
        """Load a checkpoint from a local folder or the Hugging Face Hub; ``"random"`` loads a
        small random checkpoint of the same layout (:func:`m3connect.testing.random_checkpoint`:
        no download, meaningless vectors) to try the pipeline.

        ``device`` defaults to CUDA, then MPS, then CPU. ``dtype`` is the body's compute dtype
        (``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``). Raises
        :class:`CheckpointError` for a missing head file, a folder that is not a checkpoint, or
        a hub id that cannot be fetched (the message says how to get the files).
        """
        torch_dtype = _resolve_dtype(dtype)
        target = torch.device(device) if device is not None else _default_device()
        name = os.fspath(name_or_path)
        folder = resolve_checkpoint(
            name,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        # Imported once the files are there: a wrong path fails without the seconds it takes.
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{name}: config.json cannot be read: {exc}") from exc
        kwargs: dict[str, Any] = {
            _transformers_dtype_kwarg(): torch_dtype,
            "trust_remote_code": trust_remote_code,
            "output_loading_info": True,
        }
        try:
            model, info = AutoModel.from_pretrained(folder, config=config, **kwargs)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{name}: the model weights in {folder} cannot be loaded: {exc}"
            ) from exc
        # Missing tensors would be initialised at random by transformers with only a log line:
        # the same trap as a missing head, so refuse it the same way. The pooler is kept (the
        # hub weights include it, and dropping it makes transformers report "unexpected keys")
        # but never used, so a checkpoint without it is fine.
        missing = [key for key in info.get("missing_keys", ()) if not key.startswith("pooler.")]
        if missing:
            raise CheckpointError(
                f"{name}: the weights in {folder} lack {len(missing)} tensors of the model "
                f"({', '.join(sorted(missing)[:5])}{', ...' if len(missing) > 5 else ''}); "
                f"they would be random. Is config.json the one of these weights?"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{name}: the tokenizer in {folder} cannot be loaded: {exc}"
            ) from exc
        hidden = int(config.hidden_size)
        colbert = _load_head(folder / HEAD_FILES["colbert"], "colbert", hidden)
        sparse = _load_head(folder / HEAD_FILES["sparse"], "sparse", hidden)
        logger.info("loaded %s from %s on %s (%s)", name, folder, target, torch_dtype)
        return cls(
            model,
            tokenizer,
            colbert,
            sparse,
            name=name.rstrip("/\\") or name,
            device=target,
            body_sha256=weights_sha256(_body_files(folder)),
        )

    # -- properties ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The model name or path as given to :meth:`from_pretrained`."""
        return self._name

    @property
    def dense_dim(self) -> int:
        return int(self._model.config.hidden_size)

    @property
    def colbert_dim(self) -> int:
        return int(self._colbert.out_features)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module:
        """The transformer body (without heads)."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The body's compute dtype (the heads always run in float32)."""
        return next(self._model.parameters()).dtype

    @property
    def max_length(self) -> int:
        """The most tokens (specials included) the model's positions allow: 8192 for BGE-M3."""
        return self._max_length

    @property
    def colbert_linear(self) -> torch.nn.Linear:
        """The ColBERT head (float32; ``m3connect.finetune`` trains it in place)."""
        return self._colbert

    @property
    def sparse_linear(self) -> torch.nn.Linear:
        """The sparse head (float32; ``m3connect.finetune`` trains it in place)."""
        return self._sparse

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids dropped from the sparse weights: ``<s>``, ``</s>``, ``<pad>``, ``<unk>``."""
        return frozenset(int(i) for i in self._special_ids)

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint(
            model=self._name,
            dense_dim=self.dense_dim,
            colbert_dim=self.colbert_dim,
            heads_sha256=self._heads_sha256,
            body_sha256=self._body_sha256,
        )

    def __repr__(self) -> str:
        return f"M3Encoder(name={self._name!r}, device={str(self._device)!r}, dtype={self.dtype})"

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(
        self, texts: str | Sequence[str], max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids of each text with ``<s>``/``</s>``, truncated to ``max_length`` tokens (the
        tokenizer's ``truncation=True``) when given. No padding."""
        batch = _as_text_list(texts)
        if not batch:
            return []
        if max_length is not None:
            self._check_max_length(max_length)
        encoded = self._tokenizer(
            batch,
            add_special_tokens=True,
            truncation=max_length is not None,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            # No "sequence longer than the model" warning: counting long texts is legitimate.
            verbose=False,
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def count_tokens(self, texts: str | Sequence[str], max_length: int | None = None) -> list[int]:
        """Tokens (``<s>`` and ``</s>`` included) of each text, untruncated unless
        ``max_length`` is given; useful for chunking long documents."""
        return [len(ids) for ids in self.tokenize(texts, max_length=max_length)]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return list(self._tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

    def sparse_to_tokens(self, weights: Mapping[int, float]) -> dict[str, float]:
        """``{token_id: w}`` -> ``{token_string: w}``, for reading lexical weights."""
        ids = list(weights)
        return {
            token: float(weights[i])
            for i, token in zip(ids, self.convert_ids_to_tokens(ids), strict=True)
        }

    def tokens_to_sparse(self, weights: Mapping[str, float]) -> SparseWeights:
        """The inverse of :meth:`sparse_to_tokens`; a string not in the vocabulary is an error."""
        tokens = list(weights)
        ids = self._tokenizer.convert_tokens_to_ids(tokens)
        unknown = [
            t
            for t, i in zip(tokens, ids, strict=True)
            if i is None or (i == self._tokenizer.unk_token_id and t != self._tokenizer.unk_token)
        ]
        if unknown:
            raise ValueError(f"not in the vocabulary of {self._name}: {unknown[:10]}")
        return {int(i): float(weights[t]) for t, i in zip(tokens, ids, strict=True)}

    # -- encoding --------------------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = True,
        colbert: bool = True,
        max_length: int = 8192,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch_size: int | None = None,
        colbert_dtype: str = "float32",
        show_progress: bool = False,
        progress_callback: Callable[[int], None] | None = None,
    ) -> M3Output:
        """Dense, sparse and ColBERT vectors of ``texts``, one row per text, in input order.

        All requested parts come from one forward pass per batch; a part not requested is
        ``None`` in the result. Texts are truncated to ``max_length`` tokens (specials included).
        Batches group texts of similar length up to ``batch_tokens`` padded tokens (and at most
        ``max_batch_size`` texts); a batch that runs out of memory is retried in halves.
        ``colbert_dtype`` is ``"float32"`` or ``"float16"`` (halves the memory of the largest
        output). ``progress_callback(n)`` is called with the number of texts each finished
        batch completed (for a caller's own progress bar).
        """
        if not (dense or sparse or colbert):
            raise ValueError("nothing to compute: dense, sparse and colbert are all False")
        if colbert_dtype not in ("float32", "float16"):
            raise ValueError(f"colbert_dtype must be 'float32' or 'float16', got {colbert_dtype!r}")
        batch = _as_text_list(texts)
        self._check_max_length(max_length)
        n = len(batch)
        ids = self.tokenize(batch, max_length=max_length)
        lengths = [len(row) for row in ids]

        dense_out = np.zeros((n, self.dense_dim), dtype=np.float32) if dense else None
        sparse_out: list[SparseWeights] | None = [{} for _ in range(n)] if sparse else None
        colbert_out: list[np.ndarray] | None = [np.empty(0)] * n if colbert else None
        out_dtype = np.float16 if colbert_dtype == "float16" else np.float32

        splitter = OOMSplitter(lengths, on_oom=self._release_cached_memory)

        def run(indices: list[int]) -> dict[str, Any]:
            return self._encode_batch([ids[i] for i in indices], dense, sparse, colbert)

        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=n, desc="encoding", unit="text")
        try:
            with torch.inference_mode():
                for planned in plan_batches(lengths, batch_tokens, max_batch_size):
                    for indices, result in splitter.run(planned, run):
                        for row, index in enumerate(indices):
                            if dense_out is not None:
                                dense_out[index] = result["dense"][row]
                            if sparse_out is not None:
                                sparse_out[index] = result["sparse"][row]
                            if colbert_out is not None:
                                colbert_out[index] = result["colbert"][row].astype(
                                    out_dtype, copy=False
                                )
                    if progress is not None:
                        progress.update(len(planned))
                    if progress_callback is not None:
                        progress_callback(len(planned))
        finally:
            if progress is not None:
                progress.close()
        return M3Output(dense=dense_out, sparse=sparse_out, colbert=colbert_out)

    def encode_queries(
        self, texts: str | Sequence[str], *, max_length: int = 512, **kwargs: Any
    ) -> M3Output:
        """:meth:`encode` with the reference's query length (512 tokens)."""
        return self.encode(texts, max_length=max_length, **kwargs)

    def encode_query(self, text: str, **kwargs: Any) -> M3Embedding:
        """One query's :class:`M3Embedding` (see :meth:`encode_queries`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode_query takes one string, got {type(text).__name__}")
        return self.encode_queries(text, **kwargs)[0]

    # -- internals -------------------------------------------------------------------------

    def _check_max_length(self, max_length: int) -> None:
        if not 2 <= max_length <= self._max_length:
            raise ValueError(
                f"max_length must be between 2 and {self._max_length} (the positions of {self._name}), "
                f"got {max_length}"
            )

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's last hidden states ``[batch, length, hidden]`` (the one forward pass)."""
        return self._model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _release_cached_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        elif self._device.type == "mps":
            torch.mps.empty_cache()

    def _encode_batch(
        self, rows: list[list[int]], dense: bool, sparse: bool, colbert: bool
    ) -> dict[str, Any]:
        """One padded forward pass over ``rows`` (token ids) and the requested heads."""
        lengths = [len(row) for row in rows]
        longest = max(lengths)
        input_ids = np.full((len(rows), longest), self._pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), longest), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention[i, : len(row)] = 1
        ids_t = torch.from_numpy(input_ids).to(self._device)
        mask_t = torch.from_numpy(attention).to(self._device)
        hidden = self._hidden_states(ids_t, mask_t)
        result: dict[str, Any] = {}
        if dense:
            cls = torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1)
            result["dense"] = cls.cpu().numpy()
        if sparse:
            # Only real tokens go through the head (padding would be dropped anyway).
            real = hidden[mask_t.bool()].float()
            weights = torch.relu(self._sparse(real)).squeeze(-1).cpu().numpy()
            flat_ids = input_ids[attention.astype(bool)]
            bounds = np.cumsum(lengths)[:-1]
            result["sparse"] = [
                _max_pool_sparse(tok, w, self._special_ids)
                for tok, w in zip(
                    np.split(flat_ids, bounds), np.split(weights, bounds), strict=True
                )
            ]
        if colbert:
            keep = mask_t.bool()
            keep[:, 0] = False  # CLS is the dense vector, not a ColBERT row
            vectors = torch.nn.functional.normalize(self._colbert(hidden[keep].float()), dim=-1)
            result["colbert"] = np.split(
                vectors.cpu().numpy(), np.cumsum([n - 1 for n in lengths])[:-1]
            )
        return result


def _max_pool_sparse(
    ids: np.ndarray, weights: np.ndarray, special_ids: np.ndarray
) -> SparseWeights:
    """``{token_id: max weight}`` over the positions with weight > 0, specials dropped."""
    keep = (weights > 0) & ~np.isin(ids, special_ids)
    if not keep.any():
        return {}
    unique, inverse = np.unique(ids[keep], return_inverse=True)
    best = np.zeros(len(unique), dtype=weights.dtype)  # every kept weight is > 0
    np.maximum.at(best, inverse, weights[keep])
    return dict(zip(unique.tolist(), best.tolist(), strict=True))


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    batch = list(texts)
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
    return batch
