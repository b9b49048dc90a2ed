"""stun-lightning eval --tasks: lm-evaluation-harness on shipped offline tasks (CPU, tiny --limit)."""

import json

import pytest

from stun_lightning.cli import main
from stun_lightning.data import ASSETS_DIR

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def heavily_pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "model"
    code = main(
        [
            "prune",
            "--out",
            str(out),
            "--quiet",
            "--expert-sparsity",
            "0.5",
            "--sparsity",
            "0.7",
            "--calibration-samples",
            "8",
            "--calibration-seq-len",
            "64",
            "--eval-tokens",
            "0",
        ]
    )
    assert code == 0
    return out


def test_shipped_tasks_give_numbers_that_differ_after_pruning(heavily_pruned, tmp_path, capsys):
    results = tmp_path / "results.json"
    dense = str(ASSETS_DIR / "reference")  # the shipped model, unpruned
    tasks = "stun_wikitext2,stun_cloze,stun_gsm8k"
    code = main(
        [
            "eval",
            "--model",
            str(heavily_pruned),
            "--baseline",
            dense,
            "--tokenizer",
            str(ASSETS_DIR / "tokenizer"),
            "--tasks",
            tasks,
            "--limit",
            "2",
            "--output",
            str(results),
        ]
    )
    assert code == 0
    data = json.loads(results.read_text())
    pruned, dense = data["tasks"], data["baseline"]["tasks"]
    assert set(pruned) == set(dense) == {"stun_wikitext2", "stun_cloze", "stun_gsm8k"}
    for task in pruned:
        assert pruned[task] and all(isinstance(v, float) for v in pruned[task].values())
    assert "exact_match,strict-match" in pruned["stun_gsm8k"]
    assert 1.0 < dense["stun_wikitext2"]["word_perplexity,none"] < pruned["stun_wikitext2"]["word_perplexity,none"]
    assert (
        dense["stun_cloze"] != pruned["stun_cloze"]
        or dense["stun_wikitext2"]["bits_per_byte,none"] != pruned["stun_wikitext2"]["bits_per_byte,none"]
    )
    out = capsys.readouterr().out
    assert "| stun_wikitext2 | word_perplexity,none |" in out and "baseline" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "no_such_task_xyz"], "unknown lm-eval task(s) no_such_task_xyz"),
        (["--tasks", "stun_cloze", "--include-path", "/no/such/dir"], "--include-path /no/such/dir is not a directory"),
    ],
)
def test_missing_task_or_include_path_is_a_one_line_error(extra, message, capsys):
    assert main(["eval", *extra, "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_include_path_task_runs(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text('{"page": "The cat sat on the mat . It was a sunny day ."}\n')
    (tmp_path / "mine.yaml").write_text(
        f"task: my_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    assert main(["eval", "--tasks", "my_ppl", "--include-path", str(tmp_path)]) == 0
    assert "| my_ppl | word_perplexity,none |" in capsys.readouterr().out
