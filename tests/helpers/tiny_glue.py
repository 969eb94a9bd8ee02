"""Tiny offline stand-ins for GLUE data and a BERT checkpoint, for tests.

``make_glue_like`` writes a local folder laid out like the hub's
``nyu-mll/glue`` repo (one sub-folder of parquet files per config plus a
``README.md`` whose YAML header lists the configs), so the production code path
``datasets.load_dataset(str(root), "sst2")`` is exercised without network.

``make_tiny_bert`` saves a few-thousand-parameter BERT and a WordPiece
tokenizer whose vocabulary covers every word ``make_glue_like`` emits, so
``AutoTokenizer`` / ``AutoModelForSequenceClassification.from_pretrained``
work on the folder offline.
"""

from __future__ import annotations

import pathlib
import random
from typing import Iterable, Optional

import datasets

# Word lists the synthetic sentences are built from. The sst2 label is fully
# determined by which sentiment list the sentence's sentiment words come from,
# so even a tiny model can learn it.
POSITIVE_WORDS = [
    "good", "great", "wonderful", "excellent", "charming", "delightful",
    "brilliant", "moving", "funny", "superb", "lovely", "fresh",
]
NEGATIVE_WORDS = [
    "bad", "awful", "terrible", "boring", "dull", "clumsy",
    "tedious", "bland", "painful", "weak", "stale", "messy",
]
SUBJECT_WORDS = [
    "the", "a", "this", "that", "film", "movie", "story", "plot", "cast",
    "script", "acting", "ending", "director", "scene", "music", "show",
]
FILLER_WORDS = ["is", "was", "and", "very", "quite", "really", "so", "truly", "."]

#: Every word ``make_glue_like`` can emit; the default vocabulary of ``make_tiny_bert``.
VOCAB_WORDS = sorted(set(POSITIVE_WORDS + NEGATIVE_WORDS + SUBJECT_WORDS + FILLER_WORDS))

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_TASK_FEATURES = {
    "sst2": datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    ),
    "mrpc": datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": datasets.Value("int32"),
        }
    ),
}

SUPPORTED_TASKS = tuple(_TASK_FEATURES)


def _sentence(rng: random.Random, sentiment_words: list[str]) -> str:
    """Builds one short review-like sentence with two sentiment words."""
    words = [
        rng.choice(["the", "a", "this", "that"]),
        rng.choice(SUBJECT_WORDS[4:]),
        rng.choice(["is", "was"]),
        rng.choice(["very", "quite", "really", "so", "truly"]),
        rng.choice(sentiment_words),
        "and",
        rng.choice(sentiment_words),
        ".",
    ]
    return " ".join(words)


def _sst2_rows(rng: random.Random, n: int, with_labels: bool) -> dict[str, list]:
    rows: dict[str, list] = {"sentence": [], "label": [], "idx": []}
    for i in range(n):
        label = i % 2  # balanced classes
        words = POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS
        rows["sentence"].append(_sentence(rng, words))
        rows["label"].append(label if with_labels else -1)
        rows["idx"].append(i)
    return rows


def _mrpc_rows(rng: random.Random, n: int, with_labels: bool) -> dict[str, list]:
    rows: dict[str, list] = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    for i in range(n):
        label = i % 2
        polarity = POSITIVE_WORDS if rng.random() < 0.5 else NEGATIVE_WORDS
        first = _sentence(rng, polarity)
        if label == 1:
            # "Equivalent": same content words, reordered around "and".
            w = first.split()
            second = " ".join(w[:4] + [w[6], "and", w[4], "."])
        else:
            # "Not equivalent": the opposite sentiment.
            opposite = NEGATIVE_WORDS if polarity is POSITIVE_WORDS else POSITIVE_WORDS
            second = _sentence(rng, opposite)
        rows["sentence1"].append(first)
        rows["sentence2"].append(second)
        rows["label"].append(label if with_labels else -1)
        rows["idx"].append(i)
    return rows


def make_glue_like(
    root,
    task: str = "sst2",
    n_train: int = 64,
    n_eval: int = 32,
    seed: int = 0,
) -> pathlib.Path:
    """Writes a tiny GLUE-like dataset repo that ``datasets.load_dataset`` reads offline.

    Layout (mirrors ``nyu-mll/glue`` on the hub)::

        root/README.md                       # YAML `configs:` header, one entry per task
        root/<task>/train-00000-of-00001.parquet
        root/<task>/validation-00000-of-00001.parquet
        root/<task>/test-00000-of-00001.parquet   # labels are -1, as in GLUE

    Calling it again with another ``task`` on the same ``root`` adds that
    config; the README lists every task folder present.
    The parquet files carry the ``datasets`` features in their schema
    metadata, so ``label`` comes back as a ``ClassLabel``.

    Args:
        root: Target folder (created if needed).
        task: ``"sst2"`` or ``"mrpc"``.
        n_train: Rows in the train split.
        n_eval: Rows in the validation and in the test split.
        seed: Seed of the sentence generator; same seed -> same files.

    Returns:
        ``root`` as a ``pathlib.Path``; load with
        ``datasets.load_dataset(str(root), task)``.

    Raises:
        ValueError: Unknown ``task``.
    """
    if task not in _TASK_FEATURES:
        raise ValueError(f"task: {task!r} not supported; choose one of {SUPPORTED_TASKS}")
    root = pathlib.Path(root)
    (root / task).mkdir(parents=True, exist_ok=True)
    make_rows = _sst2_rows if task == "sst2" else _mrpc_rows
    features = _TASK_FEATURES[task]
    for split_idx, (split, n) in enumerate(
        [("train", n_train), ("validation", n_eval), ("test", n_eval)]
    ):
        # Per-split generator so split sizes don't change the other splits' contents.
        rng = random.Random(seed * 1000 + split_idx)
        rows = make_rows(rng, n, with_labels=split != "test")
        ds = datasets.Dataset.from_dict(rows, features=features)
        ds.to_parquet(str(root / task / f"{split}-00000-of-00001.parquet"))

    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in _TASK_FEATURES)
    lines = ["---", "configs:"]
    for name in present:
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for split in ("train", "validation", "test"):
            lines.append(f"  - split: {split}")
            lines.append(f"    path: {name}/{split}-*")
    lines += ["---", "", "Tiny synthetic GLUE-like data written by tests/helpers/tiny_glue.py.", ""]
    (root / "README.md").write_text("\n".join(lines))
    return root


def make_tiny_bert(
    root,
    vocab_words: Optional[Iterable[str]] = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> pathlib.Path:
    """Saves a tiny randomly initialised BERT encoder plus matching tokenizer.

    The encoder is saved without a classification head (like most hub
    checkpoints), so ``AutoModelForSequenceClassification.from_pretrained(root,
    num_labels=k)`` works for any ``k`` and only initialises the head.

    Args:
        root: Target folder (created if needed).
        vocab_words: Whole words of the WordPiece vocabulary (lower-cased);
            defaults to ``VOCAB_WORDS``, which covers everything
            ``make_glue_like`` writes. Special tokens are always added first.
        seed: Torch seed for the weight initialisation.
        max_position_embeddings: Longest sequence the model accepts.

    Returns:
        ``root`` as a ``pathlib.Path``.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    words = VOCAB_WORDS if vocab_words is None else vocab_words
    vocab = list(SPECIAL_TOKENS)
    for w in words:
        w = w.lower()
        if w not in vocab:
            vocab.append(w)
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")

    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=vocab.index("[PAD]"),
    )
    # Seed locally so callers' global RNG streams stay untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return root
