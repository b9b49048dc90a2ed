import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from stun_lightning import MoEAdapter, UnsupportedModelError, get_adapter, moe_layers, register_adapter
from stun_lightning.tiny import build_tiny_model


def test_every_family_exposes_its_moe_blocks(family):
    model = build_tiny_model(family)
    layers = moe_layers(model)
    config = model.config
    adapter = get_adapter(model)
    assert layers, family
    for layer in layers:
        assert layer.num_experts == getattr(config, adapter.count_field) == 8
        assert layer.router_weight.shape == (8, config.hidden_size)
        assert layer.top_k == config.num_experts_per_tok
        mats = layer.expert_matrices()
        assert mats["gate_up_proj"].shape[:2] == (8, 2 * mats["down_proj"].shape[2])
        assert mats["down_proj"].shape[1] == config.hidden_size
        for name in adapter.shared_attrs:
            assert getattr(layer.block, name) is not None
    if family == "deepseek_v3":
        assert [layer.index for layer in layers] == [1, 2]  # layer 0 is dense


@torch.no_grad()
def test_adapter_expert_output_matches_the_model(family):
    """The adapter's per-expert function (used for calibration norms) is the model's own expert."""
    model = build_tiny_model(family)
    layer = moe_layers(model)[0]
    x = torch.randn(5, model.config.hidden_size)
    for e in (0, 3, 7):
        index = torch.full((5, 1), e, dtype=torch.long)
        weight = torch.ones(5, 1)
        expected = layer.experts(x, index, weight)
        got = layer.adapter.expert_output(layer.experts, e, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_lists_supported_and_how_to_register():
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(UnsupportedModelError) as err:
        moe_layers(model)
    message = str(err.value)
    assert "mixtral" in message and "gpt_oss" in message and "register_adapter" in message


def test_registered_family_without_moe_blocks_is_refused():
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    register_adapter(MoEAdapter(model_types=("llama",), count_field="num_experts"))
    try:
        with pytest.raises(UnsupportedModelError, match="no MoE layers"):
            moe_layers(model)
    finally:
        from stun_lightning import adapters

        adapters._REGISTRY.pop("llama")
