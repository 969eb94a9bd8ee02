"""Tests of recipes/text/data.py: offline default data, GLUE-like loading, validation."""

import contextlib
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The repo root holds both `recipes` and `tests.helpers`; make it importable
# whatever pytest's rootdir / import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser  # noqa: E402

from recipes.text.data import (  # noqa: E402
    TextDataArguments,
    check_model_path,
    default_model_path,
    load_text_data,
    load_wordnet_sentiment,
    make_collator,
    padding_plan,
)
from recipes.text.train import device_padding_plan  # noqa: E402
from swa_accel.runner.config import parse_config  # noqa: E402
from tests.helpers.tiny_glue import make_glue_like, make_tiny_bert  # noqa: E402

MODEL_INPUTS = {"input_ids", "token_type_ids", "attention_mask", "labels"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_datasets_cache(tmp_path_factory):
    # Keep load_dataset's prepared-arrow cache out of ~/.cache during tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    make_glue_like(root, "sst2", n_train=64, n_eval=32)
    make_glue_like(root, "mrpc", n_train=48, n_eval=16)
    return root


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(str(tiny_bert))


@pytest.fixture(scope="session")
def wordnet():
    return load_wordnet_sentiment(seed=0)


def glue_args(glue_dir, tiny_bert, config="sst2", **kw):
    return TextDataArguments(
        model_name_or_path=str(tiny_bert), dataset_name=str(glue_dir), dataset_config_name=config, **kw
    )


# --------------------------------------------------------------------------- #
# Offline default dataset
# --------------------------------------------------------------------------- #


def test_wordnet_classes_and_split_sizes(wordnet):
    assert set(wordnet) == {"train", "validation", "test"}
    assert {k: len(v) for k, v in wordnet.items()} == {"train": 1847, "validation": 395, "test": 395}
    for ds in wordnet.values():
        assert ds.features["label"].names == ["negative", "neutral", "positive"]
        assert ds.features["sentence"].dtype == "string"
        assert ds.column_names == ["sentence", "label", "idx"]
    counts = {
        k: [v["label"].count(c) for c in range(3)] for k, v in wordnet.items()
    }
    assert counts == {
        "train": [619, 654, 574],
        "validation": [132, 140, 123],
        "test": [132, 140, 123],
    }
    s = wordnet["train"][0]["sentence"]
    assert ": " in s and s.split(": ", 1)[1]


def test_wordnet_splits_are_disjoint_and_deduplicated(wordnet):
    texts = {k: v["sentence"] for k, v in wordnet.items()}
    for k, t in texts.items():
        assert len(set(t)) == len(t), f"duplicate text in {k}"
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])
    idx = [i for v in wordnet.values() for i in v["idx"]]
    assert sorted(idx) == list(range(2637))


def test_wordnet_is_deterministic(wordnet):
    again = load_wordnet_sentiment(seed=0)
    for k in wordnet:
        assert again[k]["sentence"] == wordnet[k]["sentence"]
        assert again[k]["label"] == wordnet[k]["label"]
    other = load_wordnet_sentiment(seed=1)
    assert set(other["validation"]["idx"]) != set(wordnet["validation"]["idx"])
    # Stratification does not depend on the seed.
    assert other["validation"]["label"].count(0) == 132


def test_default_model_path():
    path = default_model_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert TextDataArguments().model_name_or_path == path


def test_default_data_collates(wordnet, monkeypatch):
    monkeypatch.setattr(
        "recipes.text.data.load_wordnet_sentiment", lambda seed=0: wordnet
    )  # reuse the session copy
    tok = AutoTokenizer.from_pretrained(default_model_path())
    calls = []

    @contextlib.contextmanager
    def main_process_first():
        calls.append(1)
        yield

    data = load_text_data(TextDataArguments(max_length=16), tok, main_process_first=main_process_first)
    assert calls, "main_process_first was not used"
    assert data.label_names == ["negative", "neutral", "positive"]
    assert set(data.evals) == {"validation", "test"}
    assert len(data.train) == 1847 and len(data.evals["test"]) == 395
    assert set(data.train.column_names) == MODEL_INPUTS
    assert max(len(x) for x in data.train["input_ids"]) == 16  # truncated

    rows = [data.train[i] for i in range(8)]
    batch = data.collate_fn(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == MODEL_INPUTS
    assert batch["input_ids"].shape == (8, longest)
    assert batch["attention_mask"].shape == (8, longest)
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in rows)
    assert batch["labels"].tolist() == [r["labels"] for r in rows]

    # The bundled checkpoint loads offline with a fresh 3-way head and takes the batch.
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=3)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (8, 3) and torch.isfinite(out.loss)


# --------------------------------------------------------------------------- #
# GLUE-like local datasets
# --------------------------------------------------------------------------- #


def test_glue_sst2_loads(glue_dir, tiny_bert, tiny_tokenizer):
    data = load_text_data(glue_args(glue_dir, tiny_bert, max_train_samples=40), tiny_tokenizer)
    assert data.label_names == ["negative", "positive"]
    assert set(data.evals) == {"validation"}  # GLUE's unlabelled test split is not used
    assert len(data.train) == 40 and len(data.evals["validation"]) == 32
    assert set(data.train.column_names) == MODEL_INPUTS
    # Auto column "sentence": single-segment input, no unknown words.
    assert all(set(t) == {0} for t in data.train["token_type_ids"])
    assert tiny_tokenizer.unk_token_id not in {i for ids in data.train["input_ids"] for i in ids}
    assert data.drop_last is False  # dynamic padding by default: a short last batch costs nothing
    raw = datasets.load_dataset(str(glue_dir), "sst2")["train"]
    assert data.train["labels"] == raw["label"][:40]

    # The collated batch runs through the matching tiny model.
    batch = data.collate_fn([data.train[i] for i in range(4)])
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    out = model(**batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)


def test_glue_mrpc_picks_sentence_pair(glue_dir, tiny_bert, tiny_tokenizer):
    data = load_text_data(glue_args(glue_dir, tiny_bert, "mrpc"), tiny_tokenizer)
    assert data.label_names == ["not_equivalent", "equivalent"]
    assert len(data.train) == 48 and len(data.evals["validation"]) == 16
    raw = datasets.load_dataset(str(glue_dir), "mrpc")["train"][0]
    ids = data.train[0]["input_ids"]
    assert ids == tiny_tokenizer(raw["sentence1"], raw["sentence2"])["input_ids"]
    assert ids.count(tiny_tokenizer.sep_token_id) == 2
    first = tiny_tokenizer(raw["sentence1"], add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + len(first)] == first
    assert 1 in data.train[0]["token_type_ids"]  # second segment present


def test_explicit_text_column(glue_dir, tiny_bert, tiny_tokenizer):
    # Only sentence1, even though the auto choice would be a pair.
    data = load_text_data(glue_args(glue_dir, tiny_bert, "mrpc", text_column="sentence1"), tiny_tokenizer)
    assert all(set(t) == {0} for t in data.train["token_type_ids"])


def test_hf_argument_parser(glue_dir, tiny_bert):
    (args,) = HfArgumentParser(TextDataArguments).parse_args_into_dataclasses(
        ["--model_name_or_path", str(tiny_bert), "--dataset_name", str(glue_dir),
         "--dataset_config_name", "mrpc", "--max_length", "32"]
    )
    assert args.dataset_config_name == "mrpc" and args.max_length == 32 and args.num_labels is None
    (default,) = HfArgumentParser(TextDataArguments).parse_args_into_dataclasses([])
    assert default.model_name_or_path == default_model_path()
    assert default.dataset_name == "wordnet_sentiment"
    assert default.pad_to_max_length is None


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("True", True), ("0", False)])
def test_pad_to_max_length_on_the_command_line(value, expected):
    (args,) = HfArgumentParser(TextDataArguments).parse_args_into_dataclasses(["--pad_to_max_length", value])
    assert args.pad_to_max_length is expected


@pytest.mark.parametrize("line, expected", [("", None), ("pad_to_max_length: null", None),
                                            ("pad_to_max_length: true", True), ("pad_to_max_length: false", False)])
def test_pad_to_max_length_in_yaml(tmp_path, line, expected):
    path = tmp_path / "config.yaml"
    path.write_text(f"max_length: 32\n{line}\n")
    (args,) = parse_config((TextDataArguments,), ["--config", str(path)])
    assert args.pad_to_max_length is expected and args.max_length == 32
    # The command line still overrides the file.
    (args,) = parse_config((TextDataArguments,), ["--config", str(path), "--pad_to_max_length", "true"])
    assert args.pad_to_max_length is True


# --------------------------------------------------------------------------- #
# Padding: dynamic, multiple of 8 (GPU), static max_length (XLA)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "pad_to_max_length, is_xla, is_cuda, expected",
    [
        (None, False, False, (False, None)),  # CPU: plain dynamic padding
        (None, False, True, (False, 8)),  # GPU: tensor-core friendly lengths
        (None, True, False, (True, None)),  # XLA: static shapes by default
        (False, True, False, (False, None)),  # an explicit False wins under XLA
        (True, False, False, (True, None)),  # static shapes by hand on CPU
        (True, False, True, (True, None)),  # static batches need no rounding
        (False, False, True, (False, 8)),
    ],
)
def test_padding_plan(pad_to_max_length, is_xla, is_cuda, expected):
    assert padding_plan(pad_to_max_length, is_xla=is_xla, is_cuda=is_cuda) == expected


@pytest.mark.parametrize(
    "distributed_type, device, pad_to_max_length, expected",
    [
        (DistributedType.NO, "cpu", None, (False, None)),
        (DistributedType.MULTI_CPU, "cpu", None, (False, None)),
        (DistributedType.NO, "cuda", None, (False, 8)),
        (DistributedType.MULTI_GPU, "cuda", None, (False, 8)),
        (DistributedType.XLA, "xla", None, (True, None)),
        (DistributedType.XLA, "xla", False, (False, None)),
        (DistributedType.NO, "cpu", True, (True, None)),
    ],
)
def test_device_padding_plan_reads_the_accelerator(tiny_bert, distributed_type, device, pad_to_max_length, expected):
    # Stand-in with the two attributes setup() reads, so no real GPU / TPU is needed.
    accelerator = SimpleNamespace(distributed_type=distributed_type, device=SimpleNamespace(type=device))
    args = TextDataArguments(model_name_or_path=str(tiny_bert), pad_to_max_length=pad_to_max_length)
    assert device_padding_plan(accelerator, args) == expected


def chunks(ds, size):
    return [[ds[i] for i in range(start, min(start + size, len(ds)))] for start in range(0, len(ds), size)]


def test_static_shapes_pad_every_batch_to_max_length(glue_dir, tiny_bert, tiny_tokenizer):
    max_length = 32
    data = load_text_data(
        glue_args(glue_dir, tiny_bert, max_length=max_length, max_train_samples=40), tiny_tokenizer,
        static_shapes=True,
    )
    assert data.drop_last is True
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert max(lengths) < max_length  # every row is short: padding, not truncation, makes the shape
    for split, ds in [("train", data.train), ("validation", data.evals["validation"])]:
        for rows in chunks(ds, 6):  # the last chunk is a short one
            batch = data.collate_fn(rows)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                assert batch[key].shape == (len(rows), max_length), (split, key)
            assert batch["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in rows)
            assert batch["labels"].tolist() == [r["labels"] for r in rows]
    single = data.collate_fn([data.train[lengths.index(min(lengths))]])  # the shortest row alone
    assert single["input_ids"].shape == (1, max_length)
    assert single["input_ids"][0, min(lengths):].eq(tiny_tokenizer.pad_token_id).all()

    # What the loop does with drop_last: 40 rows at batch 16 -> two full batches, no 8-row one.
    loader = DataLoader(data.train, batch_size=16, collate_fn=data.collate_fn, drop_last=data.drop_last)
    assert [tuple(b["input_ids"].shape) for b in loader] == [(16, max_length), (16, max_length)]

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    with torch.no_grad():
        out = model(**single)
    assert out.logits.shape == (1, 2) and torch.isfinite(out.loss)


def test_pad_to_multiple_of_8_rounds_up_the_longest_row(glue_dir, tiny_bert, tiny_tokenizer):
    data = load_text_data(glue_args(glue_dir, tiny_bert, "mrpc"), tiny_tokenizer, pad_to_multiple_of=8)
    assert data.drop_last is False
    longest_per_batch = []
    for ds in (data.train, data.evals["validation"]):
        for rows in chunks(ds, 5):
            batch = data.collate_fn(rows)
            longest = max(len(r["input_ids"]) for r in rows)
            longest_per_batch.append(longest)
            assert batch["input_ids"].shape == (len(rows), math.ceil(longest / 8) * 8)
            assert batch["input_ids"].shape[1] % 8 == 0
            assert batch["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in rows)
            padded = batch["attention_mask"] == 0
            assert batch["input_ids"][padded].eq(tiny_tokenizer.pad_token_id).all()
    # Otherwise the test would not tell rounding from plain longest-row padding.
    assert any(n % 8 for n in longest_per_batch), longest_per_batch


def test_padding_choice_errors_name_the_argument(glue_dir, tiny_bert, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"^pad_to_multiple_of: must be >= 1") as err:
        make_collator(tiny_tokenizer, 32, pad_to_multiple_of=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^pad_to_multiple_of: not used with static shapes"):
        load_text_data(glue_args(glue_dir, tiny_bert), tiny_tokenizer, pad_to_multiple_of=8, static_shapes=True)


# --------------------------------------------------------------------------- #
# Validation errors name the field
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs, prefix, fragment",
    [
        ({"text_column": "foo"}, "text_column:", "column 'foo' not in split 'train'; available: sentence, label, idx"),
        ({"label_column": "stars"}, "label_column:", "column 'stars' not in split 'train'"),
        ({"num_labels": 5}, "num_labels:", "config says 5 but the data has 2 labels"),
        ({"eval_split": "dev"}, "eval_split:", "split 'dev' not in dataset"),
        ({"eval_split": "test"}, "eval_split:", "unlabelled"),
        ({"max_length": 100000}, "max_length:", "model_max_length"),
    ],
)
def test_glue_errors_name_the_field(glue_dir, tiny_bert, tiny_tokenizer, kwargs, prefix, fragment):
    tok = tiny_tokenizer
    if "max_length" in kwargs:
        tok = AutoTokenizer.from_pretrained(str(tiny_bert), model_max_length=512)
    with pytest.raises(ValueError) as err:
        load_text_data(glue_args(glue_dir, tiny_bert, **kwargs), tok)
    msg = str(err.value)
    assert msg.startswith(prefix) and fragment in msg and "\n" not in msg


def test_missing_config_and_dataset_errors(glue_dir, tiny_bert, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"^dataset_config_name: .*cola"):
        load_text_data(glue_args(glue_dir, tiny_bert, "cola"), tiny_tokenizer)
    with pytest.raises(ValueError, match=r"^dataset_name: "):
        load_text_data(
            TextDataArguments(model_name_or_path=str(tiny_bert), dataset_name=str(tmp_path / "none")),
            tiny_tokenizer,
        )


def test_model_path_errors(tmp_path):
    missing = str(tmp_path / "no_such_model")
    for bad in (missing, "./no_such_model_dir", "../no/such/model"):
        with pytest.raises(ValueError, match=r"^model_name_or_path: .* is neither a local folder with config.json nor a hub id"):
            check_model_path(bad)
    with pytest.raises(ValueError, match=r"^model_name_or_path: "):
        TextDataArguments(model_name_or_path=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^model_name_or_path: "):
        check_model_path(str(tmp_path / "empty"))
    # Hub ids are not checked locally.
    check_model_path("bert-base-uncased")
    check_model_path("sentence-transformers/all-MiniLM-L6-v2")


@pytest.mark.parametrize(
    "kwargs, prefix",
    [
        ({"max_length": 0}, "max_length:"),
        ({"num_labels": 1}, "num_labels:"),
        ({"max_train_samples": 0}, "max_train_samples:"),
        ({"text_pair_column": "sentence2"}, "text_pair_column:"),
        ({"pad_to_max_length": "maybe"}, "pad_to_max_length:"),
    ],
)
def test_argument_validation(kwargs, prefix):
    with pytest.raises(ValueError, match="^" + prefix):
        TextDataArguments(**kwargs)
