"""stun-lightning report / prune --plot: PNGs + HTML whose plotted data match the report; model cards."""

import json

import pytest

from stun_lightning import moe_layers
from stun_lightning.cli import main
from stun_lightning.serialization import load_pruned
from stun_lightning.tiny import build_tiny_model, load_tokenizer

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install -e '.[test]'")
FAST = ["--quiet", "--calibration-samples", "8", "--calibration-seq-len", "64", "--eval-tokens", "512"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = build_tiny_model("qwen3_moe")
    model.save_pretrained(root / "src")
    load_tokenizer().save_pretrained(root / "src")
    out = root / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(root / "src"),
                "--out",
                str(out),
                "--plot",
                "--expert-method",
                "stun",
                "--expert-sparsity",
                "0.25",
                "--sparsity",
                "0.5",
                *FAST,
            ]
        )
        == 0
    )
    return out


def test_plot_writes_pngs_and_self_contained_html(pruned):
    figs = json.loads((pruned / "report" / "figures.json").read_text())
    assert set(figs) == {
        "experts_per_layer",
        "sparsity_per_layer",
        "sparsity_per_expert",
        "routing_frequency",
        "expert_distances",
        "quality",
    }
    for name in figs:
        assert (pruned / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    html = (pruned / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figs) and 'src="http' not in html


def test_plotted_data_match_the_report_and_the_tensors(pruned):
    report = json.loads((pruned / "stun_report.json").read_text())
    figs = json.loads((pruned / "report" / "figures.json").read_text())
    layers = sorted(report["experts_before"], key=int)
    assert figs["experts_per_layer"]["after"] == [report["experts_after"][i] for i in layers]
    assert figs["sparsity_per_layer"]["sparsity"] == [report["layer_sparsity"][i] for i in layers]
    assert figs["quality"]["perplexity"] == report["perplexity"]
    model = load_pruned(pruned)
    for row, layer, keep in zip(
        figs["sparsity_per_expert"]["matrix"], moe_layers(model), figs["expert_distances"]["survivors"]
    ):
        removed = set(report["removed_experts"].get(str(layer.index), []))
        assert [e for e, v in enumerate(row) if v is None] == sorted(removed)
        assert keep == [e for e in range(len(row)) if e not in removed]
        w = layer.expert_matrices()["down_proj"]
        kept_sparsity = [v for v in row if v is not None]
        # per-expert sparsity plotted = zeros counted in that expert's tensors (weights and biases)
        for e, v in enumerate(kept_sparsity):
            params = [p[e] for _, p in layer.expert_parameters()]
            zeros = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
            assert v == pytest.approx(zeros)
        assert w.shape[0] == len(kept_sparsity)
    before, after = figs["routing_frequency"]["before"], figs["routing_frequency"]["after"]
    for b, a, i in zip(before, after, layers):
        assert sum(b) == pytest.approx(1.0) and sum(v for v in a if v is not None) == pytest.approx(1.0)
        assert [e for e, v in enumerate(a) if v is None] == report["removed_experts"].get(i, [])
    # STUN's distance table: symmetric, no self-distance
    for m in figs["expert_distances"]["matrices"]:
        assert all(m[e][e] is None for e in range(len(m)))
        assert all(m[r][c] == pytest.approx(m[c][r]) for r in range(len(m)) for c in range(len(m)) if r != c)


def test_report_command_and_bad_dir(pruned, tmp_path, capsys):
    assert main(["report", str(pruned), "--out", str(tmp_path / "pics")]) == 0
    assert (tmp_path / "pics" / "report.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "stun_report.json does not exist" in err and len(err.splitlines()) == 1


def test_every_written_directory_carries_a_model_card(pruned, tmp_path):
    assert main(["export", "--model", str(pruned), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    for d in (pruned, tmp_path / "hf"):
        card = (d / "README.md").read_text()
        front = card.split("---")[1]
        assert "library_name: transformers" in front and "stun-lightning" in front and "qwen3_moe" in front
        assert "## Recipe" in card and "expert_method: stun" in card
        assert (
            "sparsity over expert parameters (STUN)" in card and "perplexity after" in card and "## How to load" in card
        )
        assert f'("{d.name}")' in card and ".tmp" not in card  # the final directory, not the temporary one
