"""StunCallback's statistics window (``callbacks/stats_window.py``) on a tiny real MoE model: hooks
open only over the ``stats_steps`` steps before an update, paused passes (validation) do not count,
and a checkpoint's open window is carried over."""

import torch

from stun_lightning.callbacks.stats_window import StatsWindow
from stun_lightning.schedule import SparsitySchedule
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids


def forward(model, ids):
    with torch.no_grad():
        model(ids)


def test_window_opens_before_the_update_and_ignores_paused_passes():
    model = build_tiny_model("mixtral", seed=0)
    schedule = SparsitySchedule("one_shot", start_step=4).resolved(0.5, 4)
    ids = random_ids(model, n=2, length=16)
    window = StatsWindow(stats_steps=2)
    window.before_batch(model, schedule, step=1)  # the update is 3 steps away: no hooks yet
    assert window.stats is None
    forward(model, ids)
    window.before_batch(model, schedule, step=2)  # 2 steps away: open
    assert window.stats.is_open and window.stats.tokens_seen() == 0
    forward(model, ids)
    one_pass = window.stats.tokens_seen()
    assert one_pass > 0
    window.pause(True)  # validation
    forward(model, ids)
    assert window.stats.tokens_seen() == one_pass
    window.pause(False)
    forward(model, ids)
    assert window.stats.tokens_seen() == 2 * one_pass
    stats = window.take(True, "wanda", step=4)
    assert not window.stats.is_open and sum(s.tokens for s in stats.values()) == 2 * one_pass


def test_an_open_window_survives_a_checkpoint():
    model = build_tiny_model("mixtral", seed=0)
    schedule = SparsitySchedule("one_shot", start_step=4).resolved(0.5, 4)
    ids = random_ids(model, n=2, length=16)
    before = StatsWindow(stats_steps=3)
    before.before_batch(model, schedule, step=2)
    forward(model, ids)
    saved = before.open_state()
    seen = before.stats.tokens_seen()
    after = StatsWindow(stats_steps=3)  # a new process resumed from the checkpoint
    after.pending = saved
    after.before_batch(model, schedule, step=3)
    forward(model, ids)
    assert after.stats.tokens_seen() == 2 * seen
    assert StatsWindow(stats_steps=3).open_state() is None
