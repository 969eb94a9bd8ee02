"""Averaging only what trains (`average_trainable_only`, issue 23): PEFT LoRA adapters over a frozen tiny Llama, in a
user's loop and in `transformers.Trainer` through `add_swa`. The average, the store and the candidates hold the
adapters alone; the export is a PEFT model whose `save_pretrained` writes the averaged adapter, which
`PeftModel.from_pretrained` loads back, and whose merge is the frozen weights plus the averaged update."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from swa_accel import SWA, SWAArguments
from tests.helpers.tiny_lm import tiny_llama

VOCAB, EPOCHS, STEPS_PER_EPOCH = 40, 4, 4


def lora_model():
    set_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(VOCAB), config)


def token_loader():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, VOCAB, (32, 12), generator=generator)
    return DataLoader(TensorDataset(tokens), batch_size=8, shuffle=False)


def lm_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_lora_models_adapters_alone_are_averaged_stored_and_saved_as_peft_expects(tmp_path):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, token_loader())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = SWAArguments(swa_start_epoch=2, swa_update_every_steps=1, average_trainable_only=True,
                        snapshot_every="every_epoch", lawa_ks="1", posthoc_ema_widths="0.1")
    swa = SWA(accelerator, model, optimizer, loader, args, num_epochs=EPOCHS, store_dir=tmp_path / "snapshots",
              verbose=False)
    after = {}
    for _ in range(EPOCHS):
        for (tokens,) in loader:
            accelerator.backward(lm_loss(model, tokens))
            optimizer.step()
            optimizer.zero_grad()
            swa.step()
            after[swa.steps_done] = trainable(model)

    # Only the adapters are averaged: memory scales with what trains.
    lora_names = {n for n in after[1]}
    assert lora_names and all("lora_" in n for n in lora_names)
    assert set(swa.averager.averaged) == lora_names
    averaged_numel = sum(t.numel() for t in swa.averager.averaged.values())
    total = sum(p.numel() for p in model.parameters())
    assert averaged_numel == sum(p.numel() for p in model.parameters() if p.requires_grad) < total / 10
    # ... and exactly: the float64 mean of the adapters after every step of the SWA phase.
    window = range(2 * STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH + 1)
    mean = {n: torch.stack([after[s][n] for s in window]).mean(0) for n in lora_names}
    for name in lora_names:
        torch.testing.assert_close(swa.averager.averaged[name].double(), mean[name], rtol=1e-6, atol=1e-7)
    # The store's files hold the adapters alone too, and its families are built from them.
    swa.averager.store.wait()  # (written in the background)
    weights = load_file(tmp_path / "snapshots" / "weights-00001.rank0.safetensors")
    assert set(weights) == lora_names
    lawa = swa.averager.candidate_tensors("lawa_last_1")
    for name in lora_names:
        torch.testing.assert_close(lawa[name].double(), after[EPOCHS * STEPS_PER_EPOCH][name], rtol=0, atol=1e-7)

    # The export is the PEFT model with the averaged adapters over the untouched frozen weights ...
    exported = swa.export()
    assert isinstance(exported, PeftModel)
    for name, value in exported.named_parameters():
        expected = mean[name].float() if name in lora_names else frozen[name]
        torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-7)
    # ... whose save_pretrained writes the averaged adapter, as PEFT expects, and loads back over a fresh base.
    exported.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(lora_names) and all("lora_" in n for n in saved)
    set_seed(0)
    reloaded = PeftModel.from_pretrained(tiny_llama(VOCAB), tmp_path / "adapter")
    for name, value in reloaded.named_parameters():
        if name in lora_names:
            torch.testing.assert_close(value.detach().double(), mean[name], rtol=1e-6, atol=1e-7)
    # Merged, each adapted projection is the frozen weight plus the averaged update, scaled by alpha / r.
    merged = dict(reloaded.merge_and_unload().named_parameters())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    update = mean[f"{prefix}.lora_B.default.weight"] @ mean[f"{prefix}.lora_A.default.weight"] * (8 / 4)
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"].double(),
                               frozen[f"{prefix}.base_layer.weight"].double() + update, rtol=1e-5, atol=1e-6)


def test_add_swa_averages_only_the_adapters_of_a_peft_model_in_the_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed as hf_set_seed

    from swa_accel.hf_trainer import add_swa

    hf_set_seed(0)
    model = lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokens = torch.randint(4, VOCAB, (32, 12), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()})
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=EPOCHS,
                                  learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                                  disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=data)
    callback = add_swa(trainer, SWAArguments(swa_start_epoch=2, swa_update_every_steps=1,
                                             average_trainable_only=True))
    trainer.train()
    assert callback.installed
    assert set(callback.swa.averager.averaged) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, value in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(value.detach(), frozen[name]), name
        else:
            torch.testing.assert_close(value.detach(), callback.swa.averager.averaged[name], rtol=0, atol=0)
    trainer.save_model(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert saved and all("lora_" in n for n in saved)
    assert not (tmp_path / "final" / "model.safetensors").exists()
