"""``stun-lightning fit`` (``stun_lightning.callbacks.cli``): every shipped fit recipe parses, the tiny
recipe fits end to end, and the library's own errors end in one line with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stun_lightning import StunRecipe, load_pruned, moe_layers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("fit_*.yaml")), ids=lambda p: p.name)
def test_every_fit_recipe_parses(config, capsys):
    from stun_lightning.callbacks.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(config), "--print_config"])  # the LightningCLI subcommand form
    assert exit.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    callbacks = printed["trainer"]["callbacks"]
    assert any(c["class_path"].endswith("StunCallback") for c in callbacks)


def test_cli_fit_on_the_tiny_recipe(tmp_path):
    from stun_lightning.callbacks.cli import main

    config = yaml.safe_load((CONFIGS / "fit_tiny.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["trainer"]["default_root_dir"] = str(tmp_path)
    stun = config["trainer"]["callbacks"][0]["init_args"]
    stun["save_dir"] = str(tmp_path / "model")
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    # shortened from the command line, as a user would
    # as `stun-lightning fit ...` dispatches it: the subcommand already consumed
    main(
        [
            "--config",
            str(path),
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--data.max_train_blocks=8",
            "--model.lambda_init_step=0",
            "--trainer.enable_checkpointing=false",
        ]
    )
    saved = load_pruned(tmp_path / "model")
    assert [l.num_experts for l in moe_layers(saved)] == [6, 6, 6, 6]  # the shipped reference model
    report = json.loads((tmp_path / "model" / "stun_report.json").read_text())
    assert report["within_expert_sparsity"] == pytest.approx(0.6, abs=0.01)  # one shot at the first step
    metrics = (next(tmp_path.rglob("metrics.csv"))).read_text()
    assert "val_ppl_teacher" in metrics.splitlines()[0]  # the dense figure next to the student's
    card = (tmp_path / "model" / "README.md").read_text()  # fit's final model carries a model card
    assert (
        card.startswith("---\nlibrary_name: transformers") and "sparsity inside kept experts | 6" in card
    )  # 60% (one shot)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--trainer.callbacks.init_args.recipe.metric=nope",
            "recipe metric='nope' is not one of",
        ),  # refused while the config is instantiated
        (
            "--trainer.callbacks.init_args.schedule.end_step=100",
            "end_step=100 is after the fit's max_steps=60",
        ),  # refused at setup, in trainer.fit
    ],
)
def test_cli_fit_reports_a_refused_config_in_one_line(override, message, tmp_path):
    command = [sys.executable, "-c", "import sys; from stun_lightning.cli import main; sys.exit(main())"]
    result = subprocess.run(
        [*command, "fit", "--config", str(CONFIGS / "fit_tiny.yaml"), override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert (
        errors == [result.stderr.splitlines()[-1]]
        and errors[0].startswith("stun-lightning fit: error: ")
        and message in errors[0]
    ), result.stderr


def test_cli_fit_keeps_the_traceback_of_an_error_not_raised_by_the_library(monkeypatch):
    from stun_lightning.callbacks import cli

    try:
        StunRecipe(metric="nope")
    except ValueError as err:
        ours = err
    wrapped = ValueError("Does not validate against any of the Union subtypes")
    wrapped.__cause__ = ours
    assert cli.library_error(wrapped) is ours  # what jsonargparse raises, traced back to the recipe

    def not_ours(*args, **kwargs):
        raise ValueError("a bug elsewhere")

    assert cli.library_error(ValueError("a bug elsewhere")) is None
    monkeypatch.setattr(cli, "StunLightningCLI", not_ours)
    with pytest.raises(ValueError, match="a bug elsewhere"):
        cli.main(["--config", str(CONFIGS / "fit_tiny.yaml")])
