import math

import pytest
import torch

from stun_lightning.data import heldout_path, read_texts, token_stream
from stun_lightning.evaluate import next_token_accuracy, perplexity, sliding_windows
from stun_lightning.tiny import SUPPORTED_TINY_FAMILIES, build_tiny_model, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return token_stream(tokenizer, read_texts(heldout_path()))[:400]


def hand_nll(model, window, score_from_offset):
    """Summed NLL of one window via the model's own loss, scoring positions >= offset."""
    labels = window.clone()
    labels[:score_from_offset] = -100
    n = int((labels[1:] != -100).sum())
    with torch.no_grad():
        loss = model(window[None], labels=labels[None]).loss
    return loss.item() * n, n


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_single_window_equals_exp_of_model_loss(family, ids):
    model = build_tiny_model(family)
    x = ids[:60]
    with torch.no_grad():
        expected = math.exp(model(x[None], labels=x[None]).loss.item())
    assert perplexity(model, x, seq_len=64, progress=False) == pytest.approx(expected, rel=1e-5)


def test_disjoint_windows_match_hand_computation(ids):
    model = build_tiny_model("mixtral")
    x = ids[:100]  # windows [0,32) [32,64) [64,96) [96,100)
    total, count = 0.0, 0
    for begin in range(0, 100, 32):
        nll, n = hand_nll(model, x[begin : begin + 32], 0)
        total, count = total + nll, count + n
    assert count == 100 - 4  # each window's first token is unscored
    assert perplexity(model, x, seq_len=32, progress=False) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_windows_score_only_new_tokens(ids):
    model = build_tiny_model("qwen2_moe")
    x = ids[:40]  # seq_len 16, stride 8: [0,16) scores 1..15, then 8 new tokens per window
    total, count = hand_nll(model, x[0:16], 0)
    for begin in (8, 16, 24):
        nll, n = hand_nll(model, x[begin : begin + 16], 8)
        total, count = total + nll, count + n
    assert count == 39
    ppl = perplexity(model, x, seq_len=16, stride=8, progress=False)
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert ppl != pytest.approx(perplexity(model, x, seq_len=16, progress=False), rel=1e-6)


@pytest.mark.parametrize("n,seq_len,stride", [(100, 32, None), (100, 32, 7), (33, 32, 1), (5, 32, 16), (64, 32, 32)])
def test_sliding_windows_score_every_token_but_the_first_once(n, seq_len, stride):
    scored = []
    for w in sliding_windows(n, seq_len, stride):
        assert w.end - w.begin <= seq_len and w.begin < w.score_from <= w.end
        scored += range(w.score_from, w.end)
    if stride is None or stride == seq_len:
        assert len(scored) == len(set(scored)) == n - math.ceil(n / seq_len)
    else:
        assert sorted(scored) == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(n, seq_len, seq_len + 1)


def test_batch_size_and_text_source_do_not_change_the_value(tokenizer, ids, tmp_path):
    model = build_tiny_model("olmoe")
    text = tokenizer.decode(ids[:300])
    one = perplexity(model, tokenizer, text, seq_len=64, batch_size=1, progress=False)
    four = perplexity(model, tokenizer, text, seq_len=64, batch_size=4, progress=False)
    assert one == pytest.approx(four, rel=1e-5)
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    assert perplexity(model, tokenizer, f, seq_len=64, progress=False) == pytest.approx(one, rel=1e-6)
    assert perplexity(model, tokenizer, str(f), seq_len=64, progress=False) == pytest.approx(one, rel=1e-6)
    with pytest.raises(FileNotFoundError):
        perplexity(model, tokenizer, str(tmp_path / "typo.txt"), progress=False)


def test_default_text_is_the_heldout_file(tokenizer):
    model = build_tiny_model("mixtral")
    stream = token_stream(tokenizer, read_texts(heldout_path()))
    a = perplexity(model, tokenizer, seq_len=64, max_tokens=300, progress=False)
    assert a == pytest.approx(perplexity(model, stream[:300], seq_len=64, progress=False), rel=1e-6)


def test_zero_lm_head_gives_uniform_ppl_equal_to_vocab_size(ids):
    model = build_tiny_model("gpt_oss")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ppl = perplexity(model, ids, seq_len=64, stride=32, progress=False)
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-6)


def test_a_model_trained_on_the_text_beats_a_random_one(ids):
    x = ids[:128]
    random_model = build_tiny_model("mixtral")
    trained = build_tiny_model("mixtral")
    trained.train()
    opt = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    for _ in range(30):
        loss = trained(x[None], labels=x[None]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    ppl_random = perplexity(random_model, x, seq_len=128, progress=False)
    ppl_trained = perplexity(trained, x, seq_len=128, progress=False)
    assert ppl_random > 0.5 * random_model.config.vocab_size  # random init is near uniform
    assert ppl_trained < ppl_random / 20
    acc_random = next_token_accuracy(random_model, x, seq_len=128, progress=False)
    acc_trained = next_token_accuracy(trained, x, seq_len=128, progress=False)
    assert acc_trained > 0.5 > acc_random
    assert trained.training, "evaluation must restore the model's train/eval mode"


def test_accuracy_counts_argmax_hits(ids):
    model = build_tiny_model("qwen3_moe")
    x = ids[:50]
    with torch.no_grad():
        pred = model(x[None]).logits[0, :-1].argmax(-1)
    expected = (pred == x[1:]).float().mean().item()
    assert next_token_accuracy(model, x, seq_len=64, progress=False) == pytest.approx(expected)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all-zero logits: argmax is token 0 (eos)
    assert next_token_accuracy(model, x, seq_len=64, progress=False) == pytest.approx(
        (x[1:] == 0).float().mean().item()
    )


def test_bad_inputs_raise(tokenizer, ids):
    model = build_tiny_model("mixtral")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, ids[:1], progress=False)
    with pytest.raises(ValueError, match="ids alone"):
        perplexity(model, ids, "some text", progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, ids[:20].view(2, 10), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_where_the_model_is(ids):
    model = build_tiny_model("deepseek_v3")
    cpu = perplexity(model, ids, seq_len=64, progress=False)
    gpu = perplexity(model.cuda(), ids, seq_len=64, progress=False)
    assert gpu == pytest.approx(cpu, rel=1e-3)
