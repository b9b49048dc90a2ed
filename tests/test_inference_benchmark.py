"""python -m benchmarks.inference end to end in its CPU quick mode: every row measured, outputs close to float32."""

from __future__ import annotations

from benchmarks import inference


def _rows(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_quick_cpu_run_measures_every_row(tmp_path):
    bench = inference  # benchmarks/inference.py, imported as a module
    out = tmp_path / "inference.md"
    argv = ["--quick", "--device", "cpu", "--tokens", "1", "--prefill", "16", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = _rows(out.read_text())
    expected = {
        (scope, shape, variant, t)
        for scope in ("layer", "model")
        for shape in ("mixtral", "qwen3")
        for variant in bench.VARIANTS
        for t in ("1", "16")
    }
    assert {(r["scope"], r["shape"], r["variant"], r["tokens"]) for r in rows} == expected
    for r in rows:
        assert not r["us"].startswith("error"), r
        assert float(r["err"]) < 1e-2 and float(r["err eager"]) < 1e-2, r  # bf16 vs the float32 masked dense model
        assert float(r["us"]) > 0 and float(r["floor us"]) > 0
        if r["variant"] == "dense":
            assert r["x dense"] == "1.00"
    for scope in ("layer", "model"):
        for shape in ("mixtral", "qwen3"):
            mb = {
                r["variant"]: float(r["weights MB"])
                for r in rows
                if (r["scope"], r["shape"], r["tokens"]) == (scope, shape, "1")
            }
            assert mb["both"] < mb["2:4"] < mb["dense"] and mb["both"] < mb["experts-25%"] < mb["dense"], (
                scope,
                shape,
                mb,
            )
    layer_mb = {
        r["variant"]: float(r["weights MB"])
        for r in rows
        if (r["scope"], r["shape"], r["tokens"]) == ("layer", "mixtral", "1")
    }
    assert abs(layer_mb["2:4"] / layer_mb["dense"] - 0.5625) < 5e-3  # values + 2-bit metadata
    assert abs(layer_mb["experts-25%"] / layer_mb["dense"] - 0.75) < 5e-3
