"""``stun-lightning fit`` prints no Lightning adverts and no torch deprecation of Lightning's own code,
while Lightning's real warnings, its info lines, the progress bar and the metrics still show.

The command runs in a subprocess: Lightning's log handler binds its stream at import, so capturing
the output inside this process would see nothing, with or without the filter."""

import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_fit_prints_no_lightning_tips_nor_leafspec_warning(tmp_path):
    command = [sys.executable, "-m", "stun_lightning.cli", "fit", "--config", str(CONFIGS / "fit_tiny.yaml")]
    overrides = [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=true",
        "--trainer.enable_checkpointing=false",
        "--trainer.log_every_n_steps=100",  # more than the 2 batches: Lightning's own warning must still show
        "--data.max_train_blocks=8",
        "--data.max_val_blocks=4",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'model'}",
    ]
    result = subprocess.run([*command, *overrides], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Tip:" not in output and "litlogger" not in output and "litmodels" not in output, output
    assert "LeafSpec" not in output, output
    # what stays: a real warning, Lightning's other info lines, the progress bar and its metrics
    assert "is smaller than the logging interval Trainer(log_every_n_steps=100)" in output, output
    assert "GPU available: False" in output, output
    assert "Epoch 0" in output and "val_ppl" in output, output
    assert "StunCallback report:" in output, output
