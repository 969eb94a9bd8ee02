"""One run, many averages: candidate starts and side EMAs against independent arithmetic, resume, plan, choice."""

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from swa_accel import MainProcessPlacement, WeightAverager
from swa_accel.runner.choose_start import main as choose_start_main
from swa_accel.runner.choose_start import suggest_start
from swa_accel.runner.config import ConfigError, SWAArguments, RunArguments, parse_config
from swa_accel.runner.lr_schedule import make_plan
from swa_accel.candidates import choose_candidate
from tests.test_averaging import small_net, trajectory

CPU = torch.device("cpu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def run_with_candidates(steps: int, starts: dict[int, str], decays=(0.5, 0.9)):
    """Trains `small_net` for `steps` SGD steps, averaging after each; candidate `starts[k]` begins before update k.

    Returns the averager, the model and every snapshot (float64) taken by the averager.
    """
    model = small_net()
    averager = WeightAverager(model, "swa", MainProcessPlacement(CPU), ema_decays=decays)
    snapshots = []
    for k, _ in enumerate(trajectory(model, steps)):
        if k in starts:
            averager.start_candidate(starts[k])
        averager.update(model)
        snapshots.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return averager, model, snapshots


def test_every_candidate_equals_the_arithmetic_mean_of_its_snapshots():
    starts = {0: "swa_from_0", 3: "swa_from_3", 7: "swa_from_7", 11: "swa_from_11"}
    averager, _, snapshots = run_with_candidates(12, starts)
    assert averager.candidate_names() == ["swa_from_0", "swa_from_3", "swa_from_7", "swa_from_11", "ema_0.5",
                                          "ema_0.9"]
    for k, name in starts.items():
        assert averager.candidate_updates(name) == 12 - k
        tensors = averager.candidate_tensors(name)
        for param in snapshots[0]:
            expected = torch.stack([s[param] for s in snapshots[k:]]).mean(dim=0)
            assert relative_error(tensors[param], expected) < 1e-5, (name, param)
            torch.testing.assert_close(tensors[param].double(), expected, rtol=1e-5, atol=1e-6)
    # The SWA start's candidate is the running average itself, not a copy.
    assert averager.candidate_tensors("swa_from_0") is averager.averaged
    # Later candidates really differ from the full average (else the check above could pass vacuously).
    assert relative_error(averager.candidate_tensors("swa_from_11")["4.weight"],
                          averager.averaged["4.weight"].double()) > 1e-4


def test_side_emas_follow_the_recurrence_of_the_same_updates():
    averager, _, snapshots = run_with_candidates(9, {0: "swa_from_0"}, decays=(0.5, 0.9))
    for decay in (0.5, 0.9):
        expected = snapshots[0]
        for snapshot in snapshots[1:]:
            expected = {k: decay * expected[k] + (1 - decay) * snapshot[k] for k in snapshot}
        ema = averager.candidate_tensors(f"ema_{decay:g}")
        for name, value in expected.items():
            torch.testing.assert_close(ema[name].double(), value, rtol=1e-5, atol=1e-6)


def test_a_thousand_updates_keep_late_candidates_exact():
    """The difference of two stored means amplifies their fp32 rounding by n / (n - n_c): still below 1e-5."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(20_000))
    model = nn.Module()
    model.weight = weight
    averager = WeightAverager(model, "swa", MainProcessPlacement(CPU))
    starts = {500: "from_500", 900: "from_900", 950: "from_950"}
    walk = weight.detach().double().clone()
    sums = {k: torch.zeros_like(walk) for k in starts}
    with torch.no_grad():
        for k in range(1000):
            if k in starts:
                averager.start_candidate(starts[k])
            walk += 0.01 * torch.randn_like(walk)
            weight.copy_(walk)
            averager.update(model)
            for start in starts:
                if k >= start:
                    sums[start] += weight.double()
    for start, name in starts.items():
        expected = sums[start] / (1000 - start)
        assert relative_error(averager.candidate_tensors(name)["weight"], expected) < 1e-5, name


def test_resume_restores_every_candidate_bit_identically():
    starts = {0: "swa_from_0", 4: "swa_from_4", 8: "swa_from_8"}
    model = small_net()
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in trajectory(model, 10)]

    def feed(averager, steps):
        for k in steps:
            model.load_state_dict(states[k])
            if k in starts:
                averager.start_candidate(starts[k])
            averager.update(model)

    def fresh():
        return WeightAverager(model, "swa", MainProcessPlacement(CPU), ema_decays=(0.5, 0.9))

    straight = fresh()
    feed(straight, range(10))
    interrupted = fresh()
    feed(interrupted, range(6))
    path = Path(tempfile.mkdtemp()) / "averager.pt"
    torch.save(interrupted.state_dict(), path)  # as accelerate's register_for_checkpointing does
    resumed = fresh()
    resumed.load_state_dict(torch.load(path, weights_only=False))
    assert resumed.starts["swa_from_4"][0] == 4 and "swa_from_8" not in resumed.starts
    feed(resumed, range(6, 10))
    assert resumed.n_averaged == straight.n_averaged == 10
    for name in straight.candidate_names():
        for key, value in straight.candidate_tensors(name).items():
            assert torch.equal(resumed.candidate_tensors(name)[key], value), (name, key)


def test_a_checkpoint_with_other_side_emas_is_refused():
    averager, _, _ = run_with_candidates(2, {0: "a"}, decays=(0.5,))
    other = WeightAverager(small_net(), "swa", MainProcessPlacement(CPU), ema_decays=(0.9,))
    with pytest.raises(ValueError, match=r"^ema_decays: checkpoint tracks \[0.5\], config says \[0.9\]"):
        other.load_state_dict(averager.state_dict())


def test_non_finite_weights_move_no_candidate():
    averager, model, _ = run_with_candidates(4, {0: "a", 2: "b"}, decays=(0.5,))
    before = {name: {k: v.clone() for k, v in averager.candidate_tensors(name).items()}
              for name in averager.candidate_names()}
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    averager.update(model)
    assert bool(averager.nonfinite_seen)
    for name in ("a", "ema_0.5"):
        for key, value in before[name].items():
            assert torch.equal(averager.candidate_tensors(name)[key], value), (name, key)


def test_memory_is_one_copy_per_candidate_and_none_on_other_ranks():
    model = small_net()
    numel = sum(p.numel() for p in model.parameters())
    averager = WeightAverager(model, "swa", MainProcessPlacement(CPU), ema_decays=(0.9, 0.99))
    averager.start_candidate("first")  # before any update: no copy needed
    for k, _ in enumerate(trajectory(model, 6)):
        if k in (2, 4):
            averager.start_candidate(f"from_{k}")
        averager.update(model)
    copies = [averager.averaged, *averager.emas.values(), *(s for _, s in averager.starts.values() if s is not None)]
    assert len(copies) == 5  # the average, 2 EMAs, 2 later starts
    assert sum(t.numel() * t.element_size() for c in copies for t in c.values()) == 5 * 4 * numel
    other_rank = WeightAverager(model, "swa", MainProcessPlacement(CPU), process_index=1, ema_decays=(0.9,))
    other_rank.start_candidate("x")
    other_rank.update(model)
    assert other_rank.averaged is None and other_rank.emas == {0.9: None} and other_rank.candidate_tensors("x") is None


def plan(candidates, swa_start_epoch=6, epochs=10, steps_per_epoch=5):
    training = RunArguments(num_train_epochs=epochs)
    return make_plan(steps_per_epoch, training, SWAArguments(swa_start_epoch=swa_start_epoch,
                                                             swa_start_candidates=candidates))


def test_candidate_starts_in_the_plan():
    assert plan(None).candidates == (("swa_from_epoch_6", 30),)
    assert plan("every_epoch").candidates == tuple((f"swa_from_epoch_{e}", 5 * e) for e in (6, 7, 8, 9))
    assert plan("every_2_epochs", swa_start_epoch=3).candidates == (
        ("swa_from_epoch_3", 15), ("swa_from_epoch_5", 25), ("swa_from_epoch_7", 35), ("swa_from_epoch_9", 45))
    assert plan("9,7").candidates == (("swa_from_epoch_6", 30), ("swa_from_epoch_7", 35), ("swa_from_epoch_9", 45))
    assert plan("0.75").candidates == (("swa_from_epoch_6", 30), ("swa_from_step_37", 37))
    with pytest.raises(ConfigError, match=r"^swa_start_candidates: 5 starts at optimizer step 25, before the SWA "):
        plan("5,8")
    with pytest.raises(ConfigError, match=r"^swa_start_candidates: 10 starts at optimizer step 50, but training "):
        plan("10")


@pytest.mark.parametrize("value,message", [
    ("1.5", "swa_start_candidates: list whole epochs"), ("3,0.5", "swa_start_candidates: list whole epochs"),
    ("soon", "swa_start_candidates: must be every_epoch, every_N_epochs or a list"),
    ("every_0_epochs", "swa_start_candidates: must be every_epoch, every_N_epochs or a list"), ])
def test_bad_candidate_lists_are_one_line(value, message):
    with pytest.raises(ConfigError, match="^" + message):
        SWAArguments(swa_start_candidates=value)


def test_candidate_settings_from_yaml_lists_and_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("swa_start_candidates: [12, 16]\nema_decays: [0.9, 0.99]\nselection_metric: accuracy\n")
    (swa,) = parse_config((SWAArguments,), ["--config", str(config)])
    # Lists are parsed once, into typed values, whether they come as YAML lists, comma strings or lists in code.
    assert swa.swa_start_candidates == [12.0, 16.0] and swa.ema_decays == [0.9, 0.99]
    assert swa.ema_decay_values() == (0.9, 0.99) and swa.start_candidates_spec() == ("epochs", (12.0, 16.0))
    assert SWAArguments(swa_start_candidates="12, 16", ema_decays=[0.9, 0.99], selection_metric="accuracy") == swa
    assert SWAArguments(swa_start_candidates=" every_3_epochs ").swa_start_candidates == "every_3_epochs"
    assert SWAArguments(swa_start_candidates="0.5,0.75").start_candidates_spec() == ("fractions", (0.5, 0.75))
    (swa,) = parse_config((SWAArguments,), ["--config", str(config), "--swa_start_candidates", "none"])
    assert swa.swa_start_candidates is None
    with pytest.raises(ConfigError, match=r"^ema_decays: each decay must be in \(0, 1\), got 1.5"):
        SWAArguments(ema_decays="0.9,1.5")
    with pytest.raises(ConfigError, match=r"^swa_start_candidates: candidates are averages of an SWA run"):
        SWAArguments(swa_method="ema", ema_decays="0.9")
    with pytest.raises(ConfigError, match=r"^selection_metric: must be one of nll, ece, accuracy, f1"):
        SWAArguments(selection_metric="loss")
    # A config's candidates are simply unused when averaging is off.
    assert make_plan(5, RunArguments(num_train_epochs=4), SWAArguments(
        swa_method="none", swa_start_candidates="every_epoch")).candidates == ()


def test_the_choice_reads_the_metric_in_its_direction_and_prefers_the_longer_average_on_ties():
    validation = {"swa_from_epoch_2": {"nll": 0.50, "accuracy": 0.80},
                  "swa_from_epoch_3": {"nll": 0.40, "accuracy": 0.80},
                  "ema_0.9": {"nll": 0.45, "accuracy": 0.85}}
    name, reason = choose_candidate(validation, "nll")
    assert name == "swa_from_epoch_3"
    assert reason == ("lowest validation nll (0.4000) of 3 candidates; the SWA start, swa_from_epoch_2, has 0.5000")
    assert choose_candidate(validation, "accuracy")[0] == "ema_0.9"
    tied = {"a": {"accuracy": 0.8}, "b": {"accuracy": 0.8}}
    assert choose_candidate(tied, "accuracy")[0] == "a"
    with pytest.raises(ValueError, match="^selection_metric: candidate 'a' has no validation 'nll'"):
        choose_candidate(tied, "nll")


def test_choose_start_reads_validation_and_refuses_the_test_split(tmp_path, capsys):
    records = [{"model": "base", "split": "validation", "epoch": e, "nll": v}
               for e, v in enumerate([1.0, 0.6, 0.5, 0.7], start=1)]
    records += [{"model": "base", "split": "test", "epoch": e, "nll": v}
                for e, v in enumerate([1.0, 0.9, 0.8, 0.3], start=1)]
    assert suggest_start(records)[0] == 3  # validation's minimum, not the test split's (epoch 4)
    with pytest.raises(ValueError, match="^split: choosing the SWA start on the test split leaks it"):
        suggest_start(records, split="test")
    path = tmp_path / "metrics.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert choose_start_main([str(path), "--split", "test"]) == 2
    assert "leaks it" in capsys.readouterr().err
    only_test = tmp_path / "test_only.jsonl"
    only_test.write_text("".join(json.dumps(r) + "\n" for r in records if r["split"] == "test"))
    assert choose_start_main([str(only_test)]) == 2
    assert "no base-model 'nll' records for split 'validation' (logged: test)" in capsys.readouterr().err
