"""experiments/default_run_length.py: its runs' plan and config changes, and bad arguments named before any
work (the runs themselves train the default config: experiments/results/default_run_length.md)."""

from __future__ import annotations

import pytest

from experiments import default_run_length as D


def test_one_run_per_length_and_seed_with_the_changes_after_its_own():
    assert D.run_plan("2000,1000", "0,1", []) == [(2000, 0), (2000, 1), (1000, 0), (1000, 1)]
    overrides = D.run_overrides(1000, 1, ["optim.learning_rate=2e-3"])
    assert overrides == [("train.num_steps", "1000"), ("seed", "1"), ("optim.learning_rate", "2e-3")]
    command = D.train_command("w", overrides)
    assert command[-3:] == ["--config.train.num_steps=1000", "--config.seed=1", "--config.optim.learning_rate=2e-3"]
    assert command[2:4] == [f"--config={D.CONFIG}", "--workdir=w"]


@pytest.mark.parametrize(
    "steps, seeds, changes, match",
    [
        ("ten", "0", [], "--steps ten --train-seeds 0: use comma-separated integers"),
        ("100,0", "0", [], "--steps 100,0: use positive step counts"),
        ("100", "0", ["optim.learning_rate"], "--set 'optim.learning_rate': use key=value"),
        ("100", "0", ["optim.learning_rat=2e-3"], "--set optim.learning_rat=2e-3: .*'optim.learning_rat'"),
    ],
)
def test_bad_arguments_are_named_before_any_work(steps, seeds, changes, match):
    with pytest.raises(ValueError, match=match):
        D.run_plan(steps, seeds, changes)
