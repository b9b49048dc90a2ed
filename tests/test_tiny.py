import time
from pathlib import Path

import pytest
import torch

from stun_lightning.tiny import (
    SUPPORTED_TINY_FAMILIES,
    TOKENIZER_DIR,
    build_tiny_model,
    load_tokenizer,
    tiny_config,
)

SAMPLE = (
    "def area(r: float) -> float:\n"
    '    """Circle area."""\n'
    "\treturn 3.14159 * r ** 2  # ≈ π r²\n\n"
    "Question: Tom has 12 apples and eats 5. How many are left?\n"
    "Answer: 12-5=<<12-5=7>>7\n#### 7\n\n"
    "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    "Homarus gammarus , known as the European lobster , is a species of <unk> lobster . 😀 naïve café\r\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sample_ids(tokenizer):
    return torch.tensor([tokenizer(SAMPLE)["input_ids"]])


def n_experts(model):
    return next(m for name, m in model.named_modules() if name.endswith("mlp.experts")).down_proj.shape[0]


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_forward_gives_finite_logits_of_vocab_size(family, tokenizer, sample_ids):
    model = build_tiny_model(family)
    assert model.config.model_type == family
    assert n_experts(model) == 8 and model.config.num_experts_per_tok == 2
    batch = torch.cat([sample_ids, sample_ids.flip(1)])
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape == (2, sample_ids.shape[1], len(tokenizer))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Routing must depend on the input: two different sequences give different logits.
    assert not torch.allclose(logits[0], logits[1].flip(0))


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_generate_with_cache_matches_greedy_full_forward(family, sample_ids):
    model = build_tiny_model(family)
    prompt = sample_ids[:, :20]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 28)
    assert torch.equal(out[:, :20], prompt)
    with torch.no_grad():
        greedy = model(out).logits[:, 19:-1].argmax(-1)
    assert torch.equal(greedy, out[:, 20:])


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_experts_tile_into_2_4_masks(family):
    model = build_tiny_model(family)
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert experts, "no fused experts module found"
    for e in experts:
        # GPT-OSS stores experts transposed ([E, in, out], gate/up interleaved); the others [E, out, in].
        down = e.down_proj.transpose(1, 2) if family == "gpt_oss" else e.down_proj
        gate_up = e.gate_up_proj.transpose(1, 2) if family == "gpt_oss" else e.gate_up_proj
        assert down.shape == (8, 64, 32) and gate_up.shape == (8, 64, 64)
        assert down.shape[-1] % 8 == 0 and gate_up.shape[-1] % 8 == 0  # 2:4 / 4:8 groups along the input dim


def test_seed_makes_models_identical_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model("qwen3_moe", seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "build_tiny_model consumed the caller's RNG"
    b = build_tiny_model("qwen3_moe", seed=7)
    c = build_tiny_model("qwen3_moe", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_is_fast():
    build_tiny_model("deepseek_v3")  # warm imports
    start = time.perf_counter()
    for family in SUPPORTED_TINY_FAMILIES:
        build_tiny_model(family)
    assert (time.perf_counter() - start) / len(SUPPORTED_TINY_FAMILIES) < 1.0


def test_family_specific_structure():
    ds = build_tiny_model("deepseek_v3")
    layers = ds.model.layers
    assert len(layers) == 3
    assert not hasattr(layers[0].mlp, "experts"), "first_k_dense_replace=1 must leave layer 0 dense"
    for layer in layers[1:]:
        assert hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "shared_experts")
    assert ds.config.n_group == 2 and ds.config.n_routed_experts % ds.config.n_group == 0

    qwen2 = build_tiny_model("qwen2_moe")
    assert qwen2.model.layers[0].mlp.shared_expert.down_proj.weight.shape == (64, 32)

    oss = build_tiny_model("gpt_oss")
    assert oss.config.layer_types == ["sliding_attention", "full_attention"]
    assert oss.config.sliding_window < oss.config.max_position_embeddings


def test_overrides_win_and_unknown_family_names_the_choices():
    config = tiny_config("mixtral", num_hidden_layers=3, num_local_experts=4)
    assert config.num_hidden_layers == 3 and config.num_local_experts == 4
    assert build_tiny_model("olmoe", num_experts=4).model.layers[0].mlp.experts.down_proj.shape[0] == 4
    with pytest.raises(ValueError, match="qwen3_moe"):
        tiny_config("llama")


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_config_matches_tokenizer(family, tokenizer):
    config = tiny_config(family)
    assert config.vocab_size == len(tokenizer) == 8192
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.max_position_embeddings >= 512
    assert config.hidden_size == 64 and config.num_attention_heads == 4
    assert config._attn_implementation == "eager"


def test_tokenizer_round_trips_code_math_prose_and_unicode(tokenizer, sample_ids):
    ids = sample_ids[0].tolist()
    assert tokenizer.decode(ids) == SAMPLE
    assert max(ids) < len(tokenizer)
    assert tokenizer.unk_token_id is None  # byte-level: there is nothing to map to unk
    # Arbitrary bytes-as-text survive too.
    weird = "".join(chr(c) for c in range(1, 600)) + "\x00𝔘𝔫𝔦"
    assert tokenizer.decode(tokenizer(weird)["input_ids"]) == weird


def test_tokenizer_special_tokens_and_compression(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == tokenizer.eos_token_id
    assert tokenizer("a<|endoftext|>b")["input_ids"][1] == tokenizer.eos_token_id
    # A trained BPE, not bytes: common words and indentation are single tokens.
    assert len(tokenizer("    return")["input_ids"]) <= 2
    assert len(tokenizer(" the")["input_ids"]) == 1
    size = sum(p.stat().st_size for p in Path(TOKENIZER_DIR).iterdir())
    assert size < 1_000_000


def test_load_tokenizer_from_path(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    other = load_tokenizer(tmp_path)
    assert other("x = 1")["input_ids"] == tokenizer("x = 1")["input_ids"]


def test_every_bias_of_every_tiny_family_is_non_zero(family):
    """Biases are real values (transformers initialises them to zero), and DeepSeek-V3's routing
    correction is uneven, so slicing and gating are tested on them."""
    from stun_lightning.tiny import build_tiny_model

    model = build_tiny_model(family)
    biases = [
        (n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if n.rsplit(".", 1)[-1].endswith("bias")
    ]
    assert all(bool((t != 0).all()) for _, t in biases), [n for n, t in biases if not bool((t != 0).all())]
    if family in ("gpt_oss", "deepseek_v3", "qwen2_moe"):
        assert biases
    if family == "deepseek_v3":
        correction = [t for n, t in biases if n.endswith("e_score_correction_bias")]
        assert correction and all(float(t.std()) > 0.01 for t in correction)
    assert torch.equal(build_tiny_model(family).state_dict()[biases[0][0]], biases[0][1]) if biases else True  # seeded
