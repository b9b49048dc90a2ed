"""python -m benchmarks.distributed_fit end to end on 2 CPU processes (gloo): the FSDP2 fit of a model built
on the meta device, and the resume from its sharded checkpoint, through Lightning's own launcher."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_distributed_fit_benchmark_runs_and_its_resume_continues_the_loss_curve(tmp_path):
    out = tmp_path / "fit.md"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.distributed_fit",
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--tiny",
        "--layers",
        "2",
        "--steps",
        "4",
        "--resume-steps",
        "4",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    row = re.search(r"^\| 2 \| ([\d,]+) \| ([\d.]+) \|", text, re.M)
    assert row and float(row.group(1).replace(",", "")) > 0, text
    losses = [float(v) for v in re.search(r"Loss per step: (.*)", text).group(1).split(", ")]
    assert len(losses) == 4 and all(v > 0 for v in losses)
    resumed = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [int(s) for s, _, _ in resumed] == [3, 4]  # the steps after the checkpoint at step 2
    assert all(abs(float(a) - float(b)) < 1e-3 for _, a, b in resumed), resumed
    assert "expert sets equal: True; masks equal: True" in text
    assert ".distcp" in text
