"""LoRA adapters (model/lora.py) on the real architectures: frozen weights stay bit for bit, only adapters reach the
optimizer, and the merged plain model computes what the adapted one does."""
from __future__ import annotations

import logging

import pytest
import torch

from model import ModelConfig, build_model
from model.lora import LoRALinear, apply_lora, lora_parameters, merge_lora

LOG = logging.getLogger("test")


def _tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                   headdim=16, d_state=8, chunk_size=8))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    return data[:, :-1], data[:, 1:]


@pytest.mark.parametrize("arch", ["gpt", "llama", "mamba2"])
def test_training_steps_change_only_the_adapters_and_the_optimizer_holds_only_them(arch):
    model = _tiny(arch)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapped = apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=["c_attn", "c_fc", "wqkv", "w2", "in_proj"])
    assert wrapped and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    adapters = {id(p) for p in lora_parameters(model)}
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == adapters and len(in_optimizer) == 2 * len(wrapped)
    x, y = _batch()
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert {id(p) for p in optimizer.state} <= adapters and len(optimizer.state) == len(adapters)
    after = dict(model.named_parameters())
    for name, before in frozen.items():  # a wrapped layer's weight now lives under `.base`
        now = after.get(name)
        now = now if now is not None else after[name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")]
        assert torch.equal(now, before), name
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in model.modules()
               if isinstance(m, LoRALinear))  # the adapters did learn


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_merged_and_unmerged_models_give_the_same_logits(arch):
    model = _tiny(arch)
    apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=["*"])
    with torch.no_grad():  # adapters as after training (B is zero at the start, which would prove nothing)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.05)
    model.eval()
    x, _ = _batch()
    with torch.no_grad():
        adapted = model(x, x)[0]
        merge_lora(model)
        merged = model(x, x)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    plain = _tiny(arch)
    assert set(model.state_dict()) == set(plain.state_dict())  # the same safetensors keys as any model
    assert torch.allclose(adapted, merged, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged, plain.eval()(x, x)[0], atol=1e-3)  # and the adapters changed the function


def test_targets_that_match_nothing_name_the_layers_there_are():
    with pytest.raises(ValueError, match=r"match no linear layer.*c_attn"):
        apply_lora(_tiny("gpt"), rank=2, alpha=4, dropout=0.0, targets=["q_proj"])


def test_lora_without_a_parent_is_a_config_error():
    from pipeline_config import load_config
    from pipeline_config.loader import ConfigError

    with pytest.raises(ConfigError, match="train.lora adapts a trained model: set train.init_from"):
        load_config("quickstart", ["train.lora={rank: 8, alpha: 16}"])
    cfg = load_config("quickstart", ["train.init_from=champion", "train.lora={rank: 8}"])
    assert (cfg.train.lora.rank, cfg.train.lora.alpha) == (8, 16.0)
