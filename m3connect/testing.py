"""A tiny random checkpoint with exactly the layout of ``BAAI/bge-m3``.

No machine of this project can download the real weights, and users who want to try the
pipeline before downloading 2.3 GB should not have to either. :func:`build_random_checkpoint`
writes, in about a second, a folder that :class:`m3connect.encoder.M3Encoder` (and any other
loader of the real checkpoint) reads through the very same code path:

- ``config.json``: an ``XLMRobertaModel`` config (8194 positions, pad 1, bos 0, eos 2);
- ``model.safetensors``: the randomly initialised body;
- ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``: an XLM-R style
  Unigram tokenizer (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>`` last,
  ``<s> X </s>``) whose vocabulary is derived from a small multilingual text;
- ``colbert_linear.pt`` (``Linear(hidden, hidden)``, float16 like the hub) and
  ``sparse_linear.pt`` (``Linear(hidden, 1)``): plain ``state_dict``s.

The vectors it produces mean nothing; their *shapes and the arithmetic on them* are those of
the real model, which is what the tests check.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = [
    "SAMPLE_TEXTS",
    "ForwardPassCounter",
    "build_random_checkpoint",
    "random_checkpoint",
    "RANDOM_MODEL",
    "SPECIAL_TOKENS",
]

#: The model name that means "the small random checkpoint" everywhere a model is named:
#: ``M3Encoder.from_pretrained("random")``, ``--model random``, ``M3_MODEL=random``,
#: ``make demo MODEL=random``. (A folder called ``random`` is ``./random``.)
RANDOM_MODEL = "random"

#: The special tokens of XLM-RoBERTa in id order; ``<mask>`` is appended after the vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"

#: The text the tokenizer's vocabulary is derived from; also handy sample documents.
SAMPLE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the search engine indexes every page.",
    "Dense retrieval encodes the query and the passage into one vector and compares them.",
    "Sparse retrieval gives each token a weight, and the lexical score sums shared tokens.",
    "Multi vector retrieval keeps one vector per token and scores with late interaction.",
    "A hybrid system combines dense, sparse and multi vector scores into one ranking.",
    "Long documents of thousands of tokens are split into chunks before they are indexed.",
    "The database stores the vectors, answers nearest neighbour queries and fuses results.",
    "Reciprocal rank fusion adds one over k plus rank for every list a document appears in.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "How many people live in Seoul? About ten million people live in the city of Seoul.",
    "Machine learning models learn patterns from data; deep learning uses neural networks.",
    "Der schnelle braune Fuchs springt über den faulen Hund, und die Suche findet alles.",
    "Große Sprachmodelle verstehen Fragen und Antworten in vielen Sprachen der Welt.",
    "Die Hauptstadt von Deutschland ist Berlin; München liegt im Süden des Landes.",
    "Le renard brun rapide saute par-dessus le chien paresseux près de la rivière.",
    "La recherche d'information trouve les documents pertinents pour une requête.",
    "El zorro marrón rápido salta sobre el perro perezoso en la búsqueda de comida.",
    "Быстрая коричневая лиса прыгает через ленивую собаку, а поиск находит документы.",
    "빠른 갈색 여우가 게으른 개를 뛰어넘습니다. 검색 모델은 관련 문서를 찾습니다.",
    "서울은 대한민국의 수도이며 약 천만 명의 사람들이 살고 있습니다.",
    "이 논문은 다국어, 다기능, 다중 입도의 텍스트 임베딩 모델을 소개합니다.",
    "敏捷的棕色狐狸跳过了懒狗。检索模型可以找到相关的文档。",
    "北京是中国的首都，上海是中国最大的城市之一。",
    "稠密检索、稀疏检索和多向量检索可以在一个模型中完成。",
    "素早い茶色の狐がのろまな犬を飛び越えます。検索モデルは関連する文書を見つけます。",
    "東京は日本の首都で、多くの人々が住んでいます。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول. نموذج البحث يجد المستندات المناسبة.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। खोज मॉडल दस्तावेज़ ढूंढता है।",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
)

# Characters every vocabulary gets even if the sample text lacks them, so that ordinary ASCII
# text never maps to <unk>; emoji and rare symbols are deliberately left out (they must).
_BASE_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"()[]{}-_/\\&%$#@*+=<>|~^`"
)
_METASPACE = "\u2581"  # "▁", sentencepiece's word-boundary marker
_MAX_PIECE_CHARS = 8
_SUBWORD_PIECES = 600


def _unigram_vocab(texts: tuple[str, ...]) -> list[tuple[str, float]]:
    """A sentencepiece-like Unigram vocabulary: every character, plus the most useful
    substrings of the words, each scored by its log frequency.

    Built by counting rather than with ``tokenizers``' UnigramTrainer because the trainer is
    not bit-for-bit reproducible (its scores and piece order vary from run to run), and a test
    checkpoint must be identical for a given seed.
    """
    words: Counter[str] = Counter()
    for text in texts:
        for word in text.split():
            words[_METASPACE + word] += 1
    chars: Counter[str] = Counter()
    pieces: Counter[str] = Counter()
    for word, count in words.items():
        for char in word:
            chars[char] += count
        for start in range(len(word)):
            for end in range(start + 2, min(len(word), start + _MAX_PIECE_CHARS) + 1):
                pieces[word[start:end]] += count
    for char in _BASE_ALPHABET:
        chars[char] += 1
    # Prefer substrings that save many characters across the text (the idea behind
    # sentencepiece's seed pieces); ties are broken by the string itself for determinism.
    chosen = sorted(pieces, key=lambda p: (-pieces[p] * (len(p) - 1), p))[:_SUBWORD_PIECES]
    counts = {**{p: pieces[p] for p in chosen}, **chars}
    total = sum(counts.values())
    scored = [(piece, round(math.log(count / total), 6)) for piece, count in counts.items()]
    scored.sort(key=lambda item: (-item[1], item[0]))
    return [(token, 0.0) for token in SPECIAL_TOKENS] + scored + [(MASK_TOKEN, 0.0)]


def _build_tokenizer(texts: tuple[str, ...]) -> Tokenizer:
    vocab = _unigram_vocab(texts)
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>")))
    # The same pipeline that transformers 5's XLMRobertaTokenizer rebuilds from a tokenizer.json
    # without a precompiled sentencepiece charsmap, so transformers 4 (which reads the file
    # verbatim) and 5 tokenize identically.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    # <mask> strips the space on its left, as in XLM-R ("Paris is <mask>." works).
    tokenizer.add_special_tokens(
        [AddedToken(MASK_TOKEN, lstrip=True, special=True, normalized=False)]
    )
    return tokenizer


def _init_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Scale-preserving random weights, so that the random model's vectors are not degenerate.

    With transformers' own initialisation (std 0.02 everywhere) a small random XLM-R gives
    every text the same CLS vector (cosine 1.000) and nearly no positive sparse weights: a
    useless fixture for ranking tests. Weights with std ``1/sqrt(fan_in)`` and unit-scale
    word embeddings give distinct dense vectors (cosines around 0.5-0.95), distinct token
    vectors and about half of the sparse weights > 0. Biases get a little noise so that a
    head ignoring its bias would show in the tests.
    """
    for name, param in module.named_parameters():
        if "LayerNorm" in name:
            continue  # ones and zeros, as initialised
        if name.endswith("bias"):
            param.normal_(0.0, 0.05, generator=generator)
        elif "word_embeddings" in name:
            param.normal_(0.0, 1.0, generator=generator)
        elif "embeddings" in name:
            # Positions matter less than words, as in a trained model.
            param.normal_(0.0, 0.1, generator=generator)
        else:
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=generator)


def _tokenizer_config(mask_id: int) -> dict[str, object]:
    def entry(content: str, lstrip: bool = False) -> dict[str, object]:
        return {
            "content": content,
            "lstrip": lstrip,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    decoder = {str(i): entry(token) for i, token in enumerate(SPECIAL_TOKENS)}
    decoder[str(mask_id)] = entry(MASK_TOKEN, lstrip=True)
    return {
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": MASK_TOKEN,
        "model_max_length": 8192,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "tokenizer_class": "XLMRobertaTokenizer",
        "unk_token": "<unk>",
    }


def build_random_checkpoint(
    path: str | Path,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    seed: int = 0,
    colbert_fp16: bool = True,
) -> Path:
    """Write a random checkpoint with the ``BAAI/bge-m3`` file layout into ``path``.

    The same arguments always give byte-identical weights and tokenizer files (with the same
    torch version). ``path`` is created if needed; files already there are overwritten.
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    from transformers import XLMRobertaConfig, XLMRobertaModel

    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
            f"({num_attention_heads})"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(SAMPLE_TEXTS)
    tokenizer.save(str(out / "tokenizer.json"))
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    (out / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(mask_id), indent=2, ensure_ascii=False) + "\n"
    )
    special_map = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": {"content": MASK_TOKEN, "lstrip": True, "normalized": False},
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    config = XLMRobertaConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=8194,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        architectures=["XLMRobertaModel"],
    )
    # fork_rng: building the modules draws from the global generator; the caller's random
    # state must not change. Every parameter is then overwritten from a seeded generator.
    with torch.random.fork_rng(devices=[]):
        model = XLMRobertaModel(config)  # with the pooler, like the hub checkpoint
        colbert = torch.nn.Linear(hidden_size, hidden_size)
        sparse = torch.nn.Linear(hidden_size, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (model, colbert, sparse):
            _init_parameters(module, generator)
    model.eval()
    # config + safetensors written directly (what save_pretrained writes for this model, minus
    # its progress bar on stderr).
    config.save_pretrained(out)
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )

    colbert_state = {k: v.detach().clone() for k, v in colbert.state_dict().items()}
    if colbert_fp16:
        colbert_state = {k: v.half() for k, v in colbert_state.items()}
    torch.save(colbert_state, out / "colbert_linear.pt")
    torch.save(
        {k: v.detach().clone() for k, v in sparse.state_dict().items()}, out / "sparse_linear.pt"
    )
    return out


def random_checkpoint() -> Path:
    """The random checkpoint that the model name ``"random"`` means: built once (about a
    second) in the user's cache, ``$XDG_CACHE_HOME/m3connect/random-bge-m3`` (or
    ``~/.cache/...``), with the default arguments of :func:`build_random_checkpoint`, so its
    bytes (and the fingerprint of stores indexed with it) are the same each time.

    Several processes may ask at once (Ray actors): each builds into its own folder and the
    first rename wins."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m3connect"
    folder = cache / "random-bge-m3"
    if (folder / "sparse_linear.pt").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="random-bge-m3.partial-", dir=cache))
    try:
        build_random_checkpoint(partial)
        try:
            os.rename(partial, folder)
        except OSError:  # another process was faster (or an incomplete folder is in the way)
            if not (folder / "sparse_linear.pt").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------
# What the integration packages' test suites share
# --------------------------------------------------------------------------------------------

#: Names a checkpoint folder (or hub id) for test suites to use instead of the random one,
#: e.g. a local copy of ``BAAI/bge-m3``.
CHECKPOINT_ENV = "M3CONNECT_TEST_CHECKPOINT"

#: A small multilingual corpus with metadata of every filterable type, for tests and examples.
EXAMPLE_TEXTS = [
    "Dense retrieval encodes the query and the passage into one vector and compares them.",
    "Sparse retrieval gives each token a weight, and the lexical score sums shared tokens.",
    "Multi vector retrieval keeps one vector per token and scores with late interaction.",
    "A hybrid system combines dense, sparse and multi vector scores into one ranking.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "How many people live in Seoul? About ten million people live in the city of Seoul.",
    "Die Hauptstadt von Deutschland ist Berlin; München liegt im Süden des Landes.",
    "北京是中国的首都，上海是中国最大的城市之一。",
]
EXAMPLE_METADATAS = [
    {"lang": "en", "topic": "retrieval", "year": 2021},
    {"lang": "en", "topic": "retrieval", "year": 2022},
    {"lang": "en", "topic": "retrieval", "year": 2023},
    {"lang": "en", "topic": "retrieval", "year": 2024, "tags": ["hybrid", "fusion"]},
    {"lang": "en", "topic": "geo", "year": 2015},
    {"lang": "en", "topic": "geo", "year": 2016},
    {"lang": "de", "topic": "geo", "year": 2017},
    {"lang": "zh", "topic": "geo", "year": 2018},
]


@functools.cache
def checkpoint_for_tests() -> str:
    """``$M3CONNECT_TEST_CHECKPOINT``, or a random checkpoint built once per process in a
    temporary folder (removed at exit)."""
    configured = os.environ.get(CHECKPOINT_ENV)
    if configured:
        return configured
    folder = Path(tempfile.mkdtemp(prefix="m3connect-random-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(build_random_checkpoint(folder))


class ForwardPassCounter:
    """Counts the texts that go through an encoder's model (one forward pass each), for tests
    that check that a pipeline encodes each text once.

    .. code-block:: python

        with ForwardPassCounter(encoder) as passes:
            vector_store.add_texts(texts)
        assert passes.texts == len(texts)
    """

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.texts = 0
        self.batches = 0

    def __enter__(self) -> ForwardPassCounter:
        original = self.encoder._hidden_states

        def counted(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            self.texts += int(input_ids.shape[0])
            self.batches += 1
            return original(input_ids, attention_mask)

        # An instance attribute shadows the method for this encoder only.
        self.encoder._hidden_states = counted
        return self

    def __exit__(self, *exc: object) -> None:
        del self.encoder._hidden_states

    def reset(self) -> None:
        self.texts = 0
        self.batches = 0
