"""Tests for the vision recipe models (recipes/vision/models.py) and data (recipes/vision/data.py)."""

import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from transformers import AutoModelForImageClassification

from recipes.vision.data import VisionDataArguments, decode_images, load_digits_dataset, load_vision_data
from recipes.vision.hf_models import SWACNNConfig, SWACNNForImageClassification
from recipes.vision.image_processing import image_processor
from recipes.vision.model_setup import VisionModelArguments, transformers_factory
from swa_accel.runner.config import ConfigError
from recipes.vision.models import MODEL_CLASSES, PreResNet, SmallCNN, WideResNet, build_model
from tests.helpers.tiny_datasets import CIFAR10_NAMES, make_cifar_like


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# Independent parameter-count formulas (from the architecture description, not the code)
# --------------------------------------------------------------------------------------


def bn(c):
    return 2 * c


def expected_preresnet_params(depth, num_classes, in_channels=3):
    bottleneck = depth >= 44
    n = (depth - 2) // 9 if bottleneck else (depth - 2) // 6
    exp = 4 if bottleneck else 1
    total = in_channels * 9 * 16
    inplanes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            if bottleneck:
                total += bn(inplanes) + inplanes * planes + bn(planes) + 9 * planes * planes
                total += bn(planes) + planes * planes * exp
            else:
                total += bn(inplanes) + 9 * inplanes * planes + bn(planes) + 9 * planes * planes
            if s != 1 or inplanes != planes * exp:
                total += inplanes * planes * exp  # 1x1 projection shortcut, no bias/BN
            inplanes = planes * exp
    return total + bn(64 * exp) + 64 * exp * num_classes + num_classes


def expected_wrn_params(depth, k, num_classes, in_channels=3):
    n = (depth - 4) // 6
    total = in_channels * 9 * 16
    cin = 16
    for cout in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(cin) + 9 * cin * cout + bn(cout) + 9 * cout * cout
            if cin != cout:
                total += cin * cout
            cin = cout
    return total + bn(cin) + cin * num_classes + num_classes


def expected_small_cnn_params(num_classes, in_channels, w):
    widths = [in_channels, w, w, 2 * w, 2 * w]
    total = sum(9 * a * b + bn(b) for a, b in zip(widths[:-1], widths[1:]))
    return total + 2 * w * num_classes + num_classes


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 47])
def test_preresnet_small_depths_shape_and_params(depth):
    torch.manual_seed(0)
    model = PreResNet(depth=depth, num_classes=7).eval()
    assert n_params(model) == expected_preresnet_params(depth, 7)
    # Basic blocks below depth 44, bottlenecks from there on.
    block_names = {type(m).__name__ for m in model.modules()}
    assert ("_PreActBottleneck" in block_names) == (depth >= 44)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_preresnet164_param_count_and_forward():
    model = PreResNet(depth=164, num_classes=10)
    count = n_params(model)
    assert count == expected_preresnet_params(164, 10)
    assert 1_600_000 <= count <= 1_800_000  # ~1.7M as reported for CIFAR-10
    assert n_params(PreResNet(depth=164, num_classes=100)) - count == 256 * 90 + 90
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_preresnet_grayscale_input_channels():
    model = PreResNet(depth=8, num_classes=4, in_channels=1).eval()
    assert model.conv1.in_channels == 1
    assert n_params(model) == expected_preresnet_params(8, 4, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_wideresnet_28_10_param_count():
    model = WideResNet(depth=28, widen_factor=10, num_classes=10)
    count = n_params(model)
    assert count == expected_wrn_params(28, 10, 10)
    assert 36_000_000 <= count <= 37_000_000  # ~36.5M


def test_wideresnet_small_forward_and_dropout():
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=2, num_classes=5, dropout=0.3)
    assert n_params(model) == expected_wrn_params(10, 2, 5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (2, 5)
    assert torch.equal(a, b)  # dropout off in eval mode
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout active in train mode


def test_small_cnn_shape_and_params():
    model = SmallCNN(num_classes=10, in_channels=1, width=16).eval()
    assert n_params(model) == expected_small_cnn_params(10, 1, 16)
    with torch.no_grad():
        assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: PreResNet(depth=45),
        lambda: PreResNet(depth=21),
        lambda: PreResNet(depth=2),
        lambda: WideResNet(depth=27),
        lambda: WideResNet(depth=4),
    ],
)
def test_invalid_depth_raises(factory):
    with pytest.raises(ValueError, match=r"^depth: "):
        factory()


def test_invalid_other_args_raise():
    with pytest.raises(ValueError, match=r"^num_classes: "):
        SmallCNN(num_classes=0)
    with pytest.raises(ValueError, match=r"^dropout: "):
        WideResNet(depth=10, widen_factor=1, dropout=1.0)


def test_build_model_by_name():
    model = build_model("preresnet", num_classes=3, in_channels=1, depth=20)
    assert isinstance(model, PreResNet)
    assert (model.depth, model.num_classes, model.in_channels) == (20, 3, 1)
    assert isinstance(build_model("wideresnet", 10, 3, depth=10, widen_factor=1), WideResNet)
    small = build_model("small_cnn", 10, 1, width=4)
    assert isinstance(small, SmallCNN) and small.width == 4
    assert set(MODEL_CLASSES) == {"preresnet", "wideresnet", "small_cnn"}
    with pytest.raises(ValueError, match=r"^model_name: unknown model 'resnet50'; choose one of"):
        build_model("resnet50", 10, 3)


@pytest.mark.parametrize(
    "name, kwargs, channels, input_shape",
    [
        ("preresnet", {"depth": 20}, 3, (2, 3, 16, 16)),
        ("wideresnet", {"depth": 10, "widen_factor": 2, "dropout": 0.1}, 3, (2, 3, 16, 16)),
        ("small_cnn", {"width": 8}, 1, (2, 1, 8, 8)),
    ],
)
def test_the_recipe_cnns_round_trip_through_the_auto_classes(tmp_path, name, kwargs, channels, input_shape):
    torch.manual_seed(0)
    config = SWACNNConfig(name, num_channels=channels, architecture_args=kwargs,
                          id2label={i: f"c{i}" for i in range(4)})
    model = SWACNNForImageClassification(config)
    assert type(model.net) is MODEL_CLASSES[name] and model.net.fc.out_features == 4
    # Make BN running stats non-trivial so the round trip must carry buffers too.
    with torch.no_grad():
        model.train()(torch.randn(*input_shape))
    model.eval().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["model_type"], saved["architecture"], saved["architecture_args"]) == ("swa_cnn", name, kwargs)
    assert saved["auto_map"]["AutoModelForImageClassification"] == "hf_models.SWACNNForImageClassification"
    assert (tmp_path / "hf_models.py").is_file() and (tmp_path / "models.py").is_file()

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is SWACNNForImageClassification and reloaded.config.id2label[3] == "c3"
    x = torch.randn(*input_shape)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(pixel_values=x).logits)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_an_unknown_architecture_in_a_config_is_refused():
    with pytest.raises(ValueError, match=r"^architecture: unknown 'resnet50'; choose one of"):
        SWACNNConfig("resnet50")


def test_the_grayscale_processor_turns_any_image_form_into_the_training_normalisation():
    """pipeline() hands every image over as RGB; a one-channel export's processor brings it back to the digits'
    single channel, normalised as in training."""
    pixels = np.random.default_rng(0).integers(0, 17, size=(8, 8)).astype(np.uint8)
    processor = image_processor(8, 1, 16.0, [0.3], [0.4])
    expected = (torch.tensor(pixels, dtype=torch.float32) / 16 - 0.3) / 0.4
    grey = Image.fromarray(pixels, mode="L")
    for form in (grey, grey.convert("RGB"), np.stack([pixels] * 3, axis=-1)):
        out = processor(form, return_tensors="pt")["pixel_values"]
        assert out.shape == (1, 1, 8, 8)
        torch.testing.assert_close(out[0, 0], expected)
    assert type(image_processor(32, 3, 255.0, [0.5] * 3, [0.2] * 3)).__name__.startswith("ViTImageProcessor")


def tiny_data(channels: int = 3, size: int = 8, labels: int = 5):
    return SimpleNamespace(in_channels=channels, image_size=size, label_names=[f"l{i}" for i in range(labels)])


def transformers_model(path, data, scratch=False, overrides=None):
    args = VisionModelArguments(model_name_or_path=str(path), train_from_scratch=scratch, config_overrides=overrides)
    return transformers_factory(args, data)()


def test_a_transformers_checkpoint_is_loaded_with_a_new_head_for_the_labels(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ResNetForImageClassification(config).save_pretrained(tmp_path)
    checkpoint = ResNetForImageClassification.from_pretrained(tmp_path)
    model = transformers_model(tmp_path, tiny_data())
    assert model.config.num_labels == 5 and model.config.id2label[4] == "l4"
    assert model.classifier[-1].out_features == 5
    mine, theirs = model.resnet.state_dict(), checkpoint.resnet.state_dict()
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)  # the backbone is the checkpoint's
    # One-channel data and a three-channel checkpoint: one line, with the fix.
    with pytest.raises(ConfigError, match=r"takes 3-channel images and the data has 1; use a 1-channel checkpoint, "
                                          r"or --train_from_scratch true"):
        transformers_model(tmp_path, tiny_data(channels=1))
    # From its config alone, the data's channels go in and the weights are new.
    fresh = transformers_model(tmp_path, tiny_data(channels=1), scratch=True, overrides="embedding_size=4")
    assert fresh.config.num_channels == 1 and fresh.config.embedding_size == 4


def test_a_checkpoint_for_another_image_size_is_refused_before_training(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"does not take the data's 8x8 images with 3 channel\(s\): .*; use "
                                          r"--image_size 16 \(the data resized as the checkpoint expects\), or "
                                          r"--train_from_scratch true"):
        transformers_model(tmp_path, tiny_data())
    assert transformers_model(tmp_path, tiny_data(size=16)).config.image_size == 16  # the data at its size
    model = transformers_model(tmp_path, tiny_data(), scratch=True)  # the config then takes the data's size
    assert model.config.image_size == 8
    assert model(pixel_values=torch.zeros(2, 3, 8, 8)).logits.shape == (2, 5)


def test_transformers_options_without_a_checkpoint_are_refused():
    with pytest.raises(ConfigError, match=r"^config_overrides and train_from_scratch apply to model_name_or_path"):
        VisionModelArguments(config_overrides="embedding_size=4")
    with pytest.raises(ConfigError, match=r"^model_name: unknown model 'resnet'; .*or give a transformers checkpoint"):
        VisionModelArguments(model_name="resnet")


# --------------------------------------------------------------------------------------
# Data: arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"label_noise": 1.5}, "label_noise"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"max_train_samples": 0}, "max_train_samples"),
        ({"max_eval_samples": -3}, "max_eval_samples"),
        ({"num_labels": 1}, "num_labels"),
        ({"dataset_name": ""}, "dataset_name"),
        ({"eval_split": " , "}, "eval_split"),
        ({"train_split": ""}, "train_split"),
    ],
)
def test_data_arguments_validation(kwargs, field_name):
    with pytest.raises(ValueError, match=rf"^{field_name}: "):
        VisionDataArguments(**kwargs)


def test_label_noise_error_message():
    with pytest.raises(ValueError) as info:
        VisionDataArguments(label_noise=1.5)
    assert str(info.value) == "label_noise: must be in [0, 1), got 1.5"


def test_data_arguments_parse_with_hf_argument_parser():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(VisionDataArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--label_noise", "0.2", "--augment", "--max_train_samples", "10", "--eval_split", "test"]
    )
    assert args.label_noise == 0.2 and args.augment and args.max_train_samples == 10
    assert args.image_column is None and args.num_labels is None


# --------------------------------------------------------------------------------------
# Data: digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_dataset_splits(digits):
    assert set(digits) == {"train", "test"}
    n_train, n_test = len(digits["train"]), len(digits["test"])
    assert n_train + n_test == 1797
    assert abs(n_test / 1797 - 0.3) < 0.01
    label_feature = digits["train"].features["label"]
    assert isinstance(label_feature, datasets.ClassLabel)
    assert label_feature.names == [str(i) for i in range(10)]
    image = np.asarray(digits["train"][0]["image"])
    assert image.shape == (8, 8)
    assert image.min() >= 0 and image.max() <= 16
    # Stratified: every class has (nearly) the same share in both splits.
    train_counts = np.bincount(digits["train"]["label"], minlength=10) / n_train
    test_counts = np.bincount(digits["test"]["label"], minlength=10) / n_test
    assert np.abs(train_counts - test_counts).max() < 0.01
    # Fixed seed: same split every call.
    again = load_digits_dataset()
    assert again["test"]["label"] == digits["test"]["label"]


def test_digits_vision_data_rows_and_collate():
    data = load_vision_data(VisionDataArguments())
    assert (data.in_channels, data.image_size) == (1, 8)
    assert data.label_names == [str(i) for i in range(10)]
    assert list(data.evals) == ["test"]
    assert len(data.train) + len(data.evals["test"]) == 1797
    row = data.train[0]
    assert set(row) == {"pixel_values", "labels"}
    assert row["pixel_values"].shape == (1, 8, 8) and row["pixel_values"].dtype == torch.float32
    assert row["labels"].dtype == torch.int64 and row["labels"].ndim == 0
    batch = default_collate([data.evals["test"][i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 1, 8, 8)
    assert batch["labels"].shape == (5,) and batch["labels"].dtype == torch.int64
    # Normalised with train statistics: train pixels have ~zero mean, ~unit std.
    train_pixels = data.train[:]["pixel_values"]
    assert abs(train_pixels.mean().item()) < 1e-4
    assert abs(train_pixels.std().item() - 1.0) < 1e-3


def test_digits_label_noise_exact_and_deterministic(digits):
    clean_train = np.asarray(digits["train"]["label"])
    clean_test = np.asarray(digits["test"]["label"])
    args = VisionDataArguments(label_noise=0.3, label_noise_seed=123)
    data = load_vision_data(args)
    noisy_train = data.train[:]["labels"].numpy()
    changed = np.flatnonzero(noisy_train != clean_train)
    assert len(changed) == round(0.3 * len(clean_train))
    assert changed.tolist() == data.noisy_indices
    assert set(noisy_train.tolist()) <= set(range(10))
    # Eval split stays clean.
    np.testing.assert_array_equal(data.evals["test"][:]["labels"].numpy(), clean_test)
    # Deterministic for a given seed, different for another seed.
    again = load_vision_data(args)
    np.testing.assert_array_equal(again.train[:]["labels"].numpy(), noisy_train)
    other = load_vision_data(VisionDataArguments(label_noise=0.3, label_noise_seed=124))
    assert not np.array_equal(other.train[:]["labels"].numpy(), noisy_train)
    # Pixels are untouched by label noise.
    clean = load_vision_data(VisionDataArguments())
    assert torch.equal(clean.train[:]["pixel_values"], data.train[:]["pixel_values"])


def test_label_noise_is_roughly_uniform_over_other_classes(digits):
    clean = np.asarray(digits["train"]["label"])
    data = load_vision_data(VisionDataArguments(label_noise=0.9, label_noise_seed=0))
    noisy = data.train[:]["labels"].numpy()
    changed = noisy != clean
    assert changed.sum() == round(0.9 * len(clean))
    # Offsets (new - old) mod 10 cover 1..9 about equally; never 0.
    offsets = np.bincount((noisy[changed] - clean[changed]) % 10, minlength=10)
    assert offsets[0] == 0
    assert offsets[1:].min() > 0.5 * offsets[1:].mean()


def test_max_samples_limits():
    data = load_vision_data(VisionDataArguments(max_train_samples=50, max_eval_samples=20, label_noise=0.1))
    assert len(data.train) == 50 and len(data.evals["test"]) == 20
    assert len(data.noisy_indices) == 5


def test_augment_applies_to_train_only():
    plain = load_vision_data(VisionDataArguments(max_train_samples=32, max_eval_samples=32))
    aug = load_vision_data(VisionDataArguments(max_train_samples=32, max_eval_samples=32, augment=True))
    view = aug.train.view(seed=0, stream=0)
    a = view[:]["pixel_values"]
    view.set_epoch(1)
    b = view[:]["pixel_values"]
    assert a.shape == plain.train[:]["pixel_values"].shape
    assert not torch.equal(a, b)  # random crops/flips differ between epochs
    assert not torch.equal(a, plain.train[:]["pixel_values"])
    assert torch.equal(aug.train.view(augment=False)[:]["pixel_values"], plain.train[:]["pixel_values"])
    assert torch.equal(aug.train[:]["labels"], plain.train[:]["labels"])
    assert torch.equal(aug.evals["test"][:]["pixel_values"], plain.evals["test"][:]["pixel_values"])


def test_digits_missing_split_and_column_errors():
    with pytest.raises(ValueError, match=r"^eval_split: split 'validation' not in dataset; available: test, train$"):
        load_vision_data(VisionDataArguments(eval_split="validation"))
    with pytest.raises(ValueError, match=r"^train_split: split 'training' not in dataset"):
        load_vision_data(VisionDataArguments(train_split="training"))
    with pytest.raises(ValueError, match=r"^label_column: column 'foo' not in dataset; available: image, label$"):
        load_vision_data(VisionDataArguments(label_column="foo"))
    with pytest.raises(ValueError, match=r"^image_column: column 'pixels' not in dataset"):
        load_vision_data(VisionDataArguments(image_column="pixels"))
    with pytest.raises(ValueError, match=r"^num_labels: config says 5 but dataset 'digits' has 10 labels$"):
        load_vision_data(VisionDataArguments(num_labels=5))
    assert load_vision_data(VisionDataArguments(num_labels=10, max_train_samples=4)).num_labels == 10


# --------------------------------------------------------------------------------------
# Data: CIFAR-like local datasets through datasets.load_dataset
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    # Keep load_dataset's Arrow cache out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture
def load_dataset_calls(monkeypatch):
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def test_make_cifar_like_schema(tmp_path):
    root = make_cifar_like(tmp_path / "tiny10", n_train=20, n_test=10)
    assert (root / "data" / "train-00000-of-00001.parquet").is_file()
    assert (root / "data" / "test-00000-of-00001.parquet").is_file()
    ds = datasets.load_dataset(str(root))
    assert set(ds) == {"train", "test"}
    assert isinstance(ds["train"].features["img"], datasets.Image)
    assert ds["train"].features["label"].names == CIFAR10_NAMES
    image = ds["train"][0]["img"]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert len(ds["train"]) == 20 and len(ds["test"]) == 10


def test_cifar_like_loads_through_load_dataset(tmp_path, load_dataset_calls):
    root = make_cifar_like(tmp_path / "tiny10", n_train=40, n_test=20)
    data = load_vision_data(VisionDataArguments(dataset_name=str(root), label_noise=0.25, label_noise_seed=1))
    assert load_dataset_calls == [((str(root),), {})]
    assert data.label_names == CIFAR10_NAMES
    assert (data.in_channels, data.image_size) == (3, 32)
    assert len(data.train) == 40 and len(data.evals["test"]) == 20
    assert len(data.noisy_indices) == 10
    row = data.train[0]
    assert row["pixel_values"].shape == (3, 32, 32) and row["pixel_values"].dtype == torch.float32
    assert row["labels"].dtype == torch.int64
    batch = default_collate([data.evals["test"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4,)
    # Per-channel normalisation with train-split statistics.
    pixels = data.train[:]["pixel_values"]
    np.testing.assert_allclose(pixels.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(pixels.std(dim=(0, 2, 3)).numpy(), 1.0, atol=1e-2)
    assert len(data.mean) == len(data.std) == 3


def test_cifar_like_class_signal_is_learnable(tmp_path):
    root = make_cifar_like(tmp_path / "tiny10", n_train=64, n_test=32)
    data = load_vision_data(VisionDataArguments(dataset_name=str(root)))
    train, test = data.train[:], data.evals["test"][:]
    # Nearest class-mean colour classifier: the class signal must be easy.
    feats_train = train["pixel_values"].mean(dim=(2, 3))
    feats_test = test["pixel_values"].mean(dim=(2, 3))
    centroids = torch.stack([feats_train[train["labels"] == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats_test, centroids).argmin(1)
    assert (pred == test["labels"]).float().mean().item() >= 0.9


def test_cifar100_like_uses_fine_label(tmp_path, load_dataset_calls):
    root = make_cifar_like(tmp_path / "tiny100", num_classes=100, n_train=30, n_test=10, cifar100=True)
    data = load_vision_data(VisionDataArguments(dataset_name=str(root), num_labels=100))
    assert load_dataset_calls == [((str(root),), {})]
    assert data.num_labels == 100
    raw = datasets.load_dataset(str(root))
    np.testing.assert_array_equal(data.train[:]["labels"].numpy(), raw["train"]["fine_label"])
    # The coarse labels can be chosen explicitly.
    coarse = load_vision_data(VisionDataArguments(dataset_name=str(root), label_column="coarse_label"))
    assert coarse.num_labels == 20
    np.testing.assert_array_equal(coarse.train[:]["labels"].numpy(), raw["train"]["coarse_label"])


def test_cifar100_like_configured_class_count(tmp_path):
    root = make_cifar_like(tmp_path / "tiny100", num_classes=12, n_train=24, n_test=12, cifar100=True, image_size=16)
    data = load_vision_data(VisionDataArguments(dataset_name=str(root), augment=True))
    assert data.num_labels == 12 and data.image_size == 16
    assert data.train[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"^num_labels: config says 100 but dataset '.*' has 12 labels$"):
        load_vision_data(VisionDataArguments(dataset_name=str(root), num_labels=100))


def test_cifar_like_errors_name_the_field(tmp_path):
    root = make_cifar_like(tmp_path / "tiny10", n_train=10, n_test=10)
    name = str(root)
    with pytest.raises(ValueError, match=r"^eval_split: split 'validation' not in dataset; available: test, train$"):
        load_vision_data(VisionDataArguments(dataset_name=name, eval_split="test,validation"))
    with pytest.raises(ValueError, match=r"^label_column: column 'fine_label' not in dataset; available: img, label$"):
        load_vision_data(VisionDataArguments(dataset_name=name, label_column="fine_label"))
    with pytest.raises(ValueError, match=r"^image_column: column 'image' not in dataset"):
        load_vision_data(VisionDataArguments(dataset_name=name, image_column="image"))
    with pytest.raises(ValueError, match=r"^num_labels: config says 5 but dataset '.*' has 10 labels$"):
        load_vision_data(VisionDataArguments(dataset_name=name, num_labels=5))


def test_auto_detect_failure_names_the_field(tmp_path):
    root = tmp_path / "odd"
    (root / "data").mkdir(parents=True)
    features = datasets.Features({"pic": datasets.Image(), "target": datasets.ClassLabel(names=["a", "b"])})
    from PIL import Image

    images = [Image.new("RGB", (4, 4), color=(i * 50, 0, 0)) for i in range(4)]
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict({"pic": images, "target": [0, 1, 0, 1]}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"^image_column: could not auto-detect"):
        load_vision_data(VisionDataArguments(dataset_name=str(root)))
    with pytest.raises(ValueError, match=r"^label_column: could not auto-detect"):
        load_vision_data(VisionDataArguments(dataset_name=str(root), image_column="pic"))
    data = load_vision_data(VisionDataArguments(dataset_name=str(root), image_column="pic", label_column="target"))
    assert data.label_names == ["a", "b"] and data.image_size == 4


@pytest.mark.parametrize("name,channels", [("cifar", 3), ("digits", 1)])
def test_image_size_resizes_as_the_exported_processor_does(tmp_path, name, channels):
    """`--image_size`: the recipe's decoded tensors are what the saved image processor makes of the original
    images (as pipeline hands them over: RGB), so the export classifies new images as the recipe evaluated."""
    if name == "cifar":
        folder = make_cifar_like(tmp_path, n_train=40, n_test=12, image_size=8)
        data = load_vision_data(VisionDataArguments(dataset_name=str(folder), image_size=20))
        originals = list(datasets.load_dataset(str(folder), split="test")["img"])
    else:
        data = load_vision_data(VisionDataArguments(dataset_name="digits", image_size=12, max_eval_samples=12))
        originals = [Image.fromarray(np.asarray(row, dtype=np.uint8))
                     for row in load_digits_dataset()["test"][:12]["image"]]
    size = 20 if name == "cifar" else 12
    assert (data.image_size, data.in_channels) == (size, channels)
    test = data.evals["test"]
    ours = test.__getitems__(list(range(len(test))))["pixel_values"]
    processor = image_processor(data.image_size, data.in_channels, data.train.scale, data.mean, data.std)
    theirs = processor([image.convert("RGB") for image in originals], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (12, channels, size, size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_image_size_makes_images_of_mixed_sizes_one_size_and_refuses_float_images():
    mixed = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8), (10, 20, 30)),
                                                Image.new("RGB", (10, 6), (200, 100, 0))]})
    with pytest.raises(ValueError, match="images must all have one size"):
        decode_images(mixed, "img")
    images = decode_images(mixed, "img", size=12)
    assert images.shape == (2, 12, 12, 3) and images.dtype == np.uint8
    assert images[1, 5, 5].tolist() == [200, 100, 0]  # a flat colour stays that colour
    floats = datasets.Dataset.from_dict({"img": [np.full((4, 4), 0.5, dtype=np.float32)]})
    with pytest.raises(ValueError, match="^image_size: resizing needs 8-bit images"):
        decode_images(floats, "img", size=8)
