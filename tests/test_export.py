import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stun_lightning import StunRecipe, keep_experts, moe_layers, prune, save_pruned
from stun_lightning.cli import main
from stun_lightning.export import AotiDecoder, export, load_exported
from stun_lightning.sparse import Not24SparseError, is_sparsified, sparsify
from stun_lightning.sparse.checkpoint import CONFIG_FIELD, WEIGHTS_NAME
from stun_lightning.sparse.convert import expert_modules
from stun_lightning.tiny import build_tiny_model, load_tokenizer

from conftest import assert_refuses_tampered_checkpoint, logits, random_ids

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
has_compiler = shutil.which("g++") or shutil.which("c++")


def pruned_24(family="mixtral", layer_budget="uniform", seed=0):
    model = build_tiny_model(family, seed=seed, num_hidden_layers=3 if family != "deepseek_v3" else 4)
    ids = random_ids(model, n=4, length=16)
    prune(
        model,
        StunRecipe(expert_sparsity=0.25, pattern="2:4", metric="magnitude", layer_budget=layer_budget),
        calibration=ids,
        progress=False,
    )
    return model.eval(), ids


def test_hf_export_loads_in_plain_transformers_even_from_a_sparse_model(tmp_path):
    model, ids = pruned_24()
    expected = logits(model, ids)
    plain = AutoModelForCausalLM.from_pretrained(export(model, tmp_path / "a", "hf"))
    torch.testing.assert_close(logits(plain, ids), expected)
    sparsify(model)
    plain = AutoModelForCausalLM.from_pretrained(export(model, tmp_path / "b", "hf"))
    torch.testing.assert_close(logits(plain, ids), expected)
    assert is_sparsified(model)  # exporting left the model compressed, as it was given


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_sparse_export_round_trips_without_recompressing(family, tmp_path, monkeypatch):
    model, ids = pruned_24(family)
    expected = logits(model, ids)
    path = export(model, tmp_path / "sparse", "sparse")
    assert not is_sparsified(model)  # a dense model stays dense
    assert (path / WEIGHTS_NAME).exists() and not (path / "model.safetensors").exists()
    assert json.loads((path / "config.json").read_text())[CONFIG_FIELD]["pattern"] == "2:4"

    import stun_lightning.sparse.convert as convert

    monkeypatch.setattr(convert, "compress_24", lambda *a, **k: pytest.fail("loading recompressed a weight"))
    loaded = load_exported(path)
    assert is_sparsified(loaded) and not any("gate_up_proj" in e._parameters for _, e, _ in expert_modules(loaded))
    torch.testing.assert_close(logits(loaded, ids), expected)
    torch.testing.assert_close(
        loaded.generate(ids[:1, :6], max_new_tokens=4, do_sample=False),
        model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False),
    )


def test_sparse_export_is_smaller_and_keeps_per_layer_counts(tmp_path):
    model = build_tiny_model("qwen3_moe", num_hidden_layers=3)
    ids = random_ids(model, n=4, length=16)
    for layer, keep in zip(moe_layers(model), ([0, 1, 2, 3, 4, 5, 6], [1, 3, 5, 7], list(range(8)))):
        keep_experts(model, layer.index, keep)
    prune(model, StunRecipe(expert_sparsity=0.0, pattern="2:4", metric="magnitude"), calibration=ids, progress=False)
    expected = logits(model, ids)
    hf = export(model, tmp_path / "hf", "hf")
    sparse = export(model, tmp_path / "sparse", "sparse")
    loaded = load_exported(sparse)
    assert [e.num_experts for _, e, _ in expert_modules(loaded)] == [7, 4, 8]
    torch.testing.assert_close(logits(loaded, ids), expected)
    hf_experts = sum(
        v.numel() * v.element_size() for k, v in load_file(hf / "model.safetensors").items() if ".experts." in k
    )
    sparse_experts = sum(
        v.numel() * v.element_size() for k, v in load_file(sparse / WEIGHTS_NAME).items() if ".experts." in k
    )
    assert sparse_experts <= 0.5625 * hf_experts


def test_sparse_checkpoint_refuses_missing_or_unused_tensors_and_plain_loading(tmp_path):
    model, _ = pruned_24()
    path = export(model, tmp_path / "sparse", "sparse")
    with pytest.raises(OSError):  # plain transformers finds no weights it knows, instead of re-initialising experts
        AutoModelForCausalLM.from_pretrained(path)
    assert_refuses_tampered_checkpoint(
        path, WEIGHTS_NAME, lambda k: k.endswith("experts.down_proj_meta"), "down_proj_meta", load_exported
    )


def test_export_refuses_non_24_and_existing_outputs(tmp_path):
    model = build_tiny_model("mixtral")
    prune(
        model,
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, metric="magnitude", layer_budget="uniform"),
        calibration=random_ids(model),
        progress=False,
    )
    with pytest.raises(Not24SparseError, match='pattern: "2:4"'):
        export(model, tmp_path / "s", "aoti")
    assert not (tmp_path / "s").exists() and not is_sparsified(model)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        export(model, tmp_path / "exists", "hf")
    with pytest.raises(ValueError, match="hf, sparse, aoti"):
        export(model, tmp_path / "x", "onnx")


def saved(model, path, **kwargs):
    save_pruned(model, path, tokenizer=load_tokenizer(), **kwargs)
    return str(path)


def test_cli_export_hf_and_sparse(tmp_path, capsys):
    model, ids = pruned_24("qwen3_moe")
    source = saved(model, tmp_path / "pruned")
    assert main(["export", "--model", source, "--format", "sparse", "--out", str(tmp_path / "sparse")]) == 0
    assert "sparse ->" in capsys.readouterr().out
    loaded = load_exported(tmp_path / "sparse")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    assert (tmp_path / "sparse" / "tokenizer.json").exists()
    # a sparse export converts back to a plain transformers directory
    assert main(["export", "--model", str(tmp_path / "sparse"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids), logits(model, ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_cli_export_bad_inputs(tmp_path, capsys):
    unstructured = build_tiny_model("mixtral")
    prune(
        unstructured,
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, metric="magnitude", layer_budget="uniform"),
        calibration=random_ids(unstructured),
        progress=False,
    )
    source = saved(unstructured, tmp_path / "unstructured")
    (tmp_path / "exists").mkdir()
    capsys.readouterr()
    cases = {
        "not 2:4": (
            ["--model", source, "--format", "aoti", "--out", str(tmp_path / "o1")],
            "layer 0 gate_up_proj is not 2:4 sparse",
        ),
        "names the fix": (["--model", source, "--format", "aoti", "--out", str(tmp_path / "o2")], 'pattern: "2:4"'),
        "existing out": (["--model", source, "--format", "hf", "--out", str(tmp_path / "exists")], "--overwrite"),
        "missing model": (
            ["--model", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "o3")],
            "does not exist",
        ),
    }
    for name, (args, message) in cases.items():
        assert main(["export", *args]) == 2, name
        err = capsys.readouterr().err
        assert "stun-lightning export: error:" in err and message in err, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "unstructured"]  # nothing written
    with pytest.raises(SystemExit):
        main(["export", "--model", source, "--format", "onnx", "--out", str(tmp_path / "o4")])


def _aoti_round_trip(model, ids, tmp_path, device):
    prompt = ids[:1, :5].to(device)
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    path = export(model, tmp_path / "aoti", "aoti", max_cache_len=32)
    decoder = load_exported(path)
    assert isinstance(decoder, AotiDecoder)
    with torch.no_grad():
        ref = model(prompt).logits
    for i in range(prompt.shape[1]):
        step = decoder.step(prompt[:, i : i + 1], i)
        assert ((step[0, -1].float() - ref[0, i].float()).norm() / ref[0, i].float().norm()).item() < 1e-2
    fresh = load_exported(path)  # each load starts with an empty cache
    assert torch.equal(fresh.greedy(prompt, 4), expected)


@pytest.mark.skipif(not has_compiler, reason="AOTInductor on CPU needs a C++ compiler")
def test_aoti_export_decodes_on_cpu(tmp_path):
    model, ids = pruned_24("mixtral")
    _aoti_round_trip(model, ids, tmp_path, "cpu")


@cuda
def test_aoti_export_decodes_on_gpu(tmp_path):
    model, ids = pruned_24("qwen3_moe")
    model = model.to("cuda")  # float32: greedy tokens comparable exactly; the package embeds the Triton kernel
    sparsify(model)
    _aoti_round_trip(model, ids, tmp_path, "cuda")
