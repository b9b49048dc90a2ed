import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from stun_lightning import load_pruned, moe_layers
from stun_lightning.cli import main
from stun_lightning.tiny import build_tiny_model, load_tokenizer

FAST = ["--quiet", "--calibration-samples", "8", "--calibration-seq-len", "64", "--eval-tokens", "512"]


def saved(model, path):
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return str(path)


def test_default_prune_prints_the_table(capsys):
    assert main(["prune", *FAST]) == 0
    out = capsys.readouterr().out
    for row in (
        "parameters (dense storage)",
        "sparsity over expert params (STUN)",
        "perplexity before",
        "perplexity after",
        "time total",
    ):
        assert row in out
    assert "32 -> " in out  # the shipped reference model: 4 MoE layers of 8 experts
    assert "auto split: held-out loss by removal fraction" in out  # the default chooses the split by its loss


def test_a_pattern_or_inner_sparsity_flag_fixes_the_default_split(capsys):
    # auto needs a total over unstructured masks: --pattern 2:4 falls back to 25% of experts per layer
    assert main(["prune", "--pattern", "2:4", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("| 8 -> 6 |") == 4 and "auto split" not in out


def test_prune_writes_a_loadable_model_and_report(tmp_path, capsys):
    source = saved(build_tiny_model("qwen3_moe"), tmp_path / "src")
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "--model",
            source,
            "--out",
            str(out),
            "--layer-budget",
            "uniform",
            "--expert-sparsity",
            "0.25",
            "--sparsity",
            "0.5",
            *FAST,
        ]
    )
    assert code == 0
    report = json.loads((out / "stun_report.json").read_text())
    assert report["experts_after"] == {"0": 6, "1": 6}
    model = load_pruned(out)
    assert [l.num_experts for l in moe_layers(model)] == [6, 6]
    assert (out / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    assert main(["eval", "--model", str(out), "--max-tokens", "300", "--seq-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out.split("saved to")[-1].split("\n", 1)[1])
    assert result["perplexity"] > 1 and 0 <= result["next_token_accuracy"] <= 1


def test_recipe_file_is_used(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("expert_sparsity: 0.5\nlayer_budget: uniform\nsparsity: 0.0\n")
    assert main(["prune", "--recipe", str(recipe), *FAST]) == 0
    assert "32 -> 16" in capsys.readouterr().out


def bad_inputs(tmp_path):
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=load_tokenizer().vocab_size + 1,
        )
    )
    odd = build_tiny_model("mixtral", intermediate_size=30)
    existing = tmp_path / "exists"
    existing.mkdir()
    return {
        "no MoE": (["--model", saved(llama, tmp_path / "llama")], "no adapter for model_type='llama'"),
        "sparsity": (["--sparsity", "1.0"], "[0, 1)"),
        "below top-k": (["--expert-sparsity", "0.9", "--layer-budget", "uniform"], "top-k"),
        "2:4 shape": (["--model", saved(odd, tmp_path / "odd"), "--pattern", "2:4"], "divisible by 4"),
        "missing calib": (["--calib", str(tmp_path / "nope.txt")], "does not exist"),
        "missing model": (["--model", str(tmp_path / "nomodel")], "does not exist"),
        "missing recipe": (["--recipe", str(tmp_path / "nope.yaml")], "does not exist"),
        "existing out": (["--out", str(existing)], "--overwrite"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no MoE",
        "sparsity",
        "below top-k",
        "2:4 shape",
        "missing calib",
        "missing model",
        "missing recipe",
        "existing out",
    ],
)
def test_bad_input_gets_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    args, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["prune", *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def stun_lightning_command():
    """The installed console script (what a user runs), or the same entry point through this interpreter."""
    script = Path(sys.executable).with_name("stun-lightning")
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from stun_lightning.cli import main; sys.exit(main())"]
    )


def test_default_prune_writes_no_warnings_to_stderr():
    # the README's first command; a warning there (e.g. an optional package transformers imports
    # when installed, like torchao) is the first thing a newcomer sees
    result = subprocess.run([*stun_lightning_command(), "prune", *FAST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warn" in line.lower()]
    assert not warnings, result.stderr
    assert result.stderr == "", result.stderr  # --quiet: no progress bars either


def test_prune_help_lists_every_registered_choice(monkeypatch, capsys):
    from stun_lightning.methods import base
    from stun_lightning.recipe import field_choices

    monkeypatch.setitem(base._METHODS, "brand_new_method", base._METHODS["random"])  # a method registered later
    with pytest.raises(SystemExit) as exit:
        main(["prune", "--help"])
    assert exit.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    for name, allowed in field_choices().items():
        if name in ("allocation_base", "low_token_rule"):  # recipe-file fields, no flag
            continue
        assert f"--{name.replace('_', '-')} {{{','.join(allowed)}}}" in usage
    assert "brand_new_method" in usage and "--pattern {unstructured,N:M}" in usage
