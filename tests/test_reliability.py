"""Fault tolerance of training: preemption (SIGTERM), a crash during a checkpoint write (SIGKILL),
damaged checkpoints, non-finite steps and a bad environment.

The kill scenarios run the CLI as a subprocess through experiments/reliability.py's helpers (one CPU
device there: checkpoint writes of 8 virtual devices are slow); the others run in-process."""

import glob
import json
import logging
import os
import shutil
import signal
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_cli
from test_training import TINY_FLAGS, restore_final_state, tiny_config

from diffjax.training import ConfigError, TrainingStopped, train
from diffjax.training import run as run_module
from diffjax.training.checkpoint import Checkpointer, CheckpointError
from diffjax.training.state import create_train_state
from experiments import reliability as rel

# ------------------------------------------------------------------------------------------------
# kills: the CLI in a subprocess
# ------------------------------------------------------------------------------------------------


# the one-level U-Net of test_training.smallest_config: the network is not what these tests are about
SMALLEST_MODEL = {"model.overrides.channel_mult": (1,), "model.overrides.attn_resolutions": ()}


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path, no_device_count):
    """SIGTERM: the step finishes, the checkpoint is saved, exit 0; the restarted CLI resumes there
    and trains to the end (exit 0, its summary, the final samples: the CLI's train mode)."""
    workdir = str(tmp_path / "run")
    long_run = {**SMALLEST_MODEL, "train.num_steps": 1000, "train.checkpoint_every": 1000}
    proc = rel.start(workdir, long_run)
    assert rel.wait_until(lambda: rel.last_logged_step(workdir) >= 2, proc, poll=0.01)
    observed = rel.last_logged_step(workdir)
    proc.send_signal(signal.SIGTERM)
    assert rel.wait(proc) == 0, rel.output(workdir)[-3000:]
    out = rel.output(workdir)
    [step] = rel.committed_steps(workdir)  # the one checkpoint: the signal's
    assert step >= observed and f"stopped by signal SIGTERM at step {step}; checkpoint saved" in out
    assert '"stopped_by": "signal SIGTERM"' in out

    assert rel.run_to_end(workdir, {**SMALLEST_MODEL, "train.num_steps": step + 1}) == 0
    restarted = rel.output(workdir)[len(out) :]
    assert rel.resumed_steps(restarted) == [step]
    assert f'"step": {step + 1}' in restarted and f"diffjax: outputs in {workdir}" in restarted
    assert os.path.exists(os.path.join(workdir, "samples", f"step_{step + 1:07d}.png"))
    _, data_state, final_step = rel.final_checkpoint(workdir)
    assert final_step == step + 1 and data_state["next_batch"] == step + 1  # the data position went on


@pytest.mark.slow  # default-run time: an end-to-end run of its own
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, no_device_count):
    workdir = str(tmp_path / "run")
    writing = os.path.join(workdir, "checkpoints", "6" + rel.TMP_SUFFIX)
    proc = rel.start(workdir, {"train.num_steps": 1000, "train.checkpoint_every": 3})
    assert rel.wait_until(lambda: os.path.exists(writing), proc, poll=0.001)
    proc.send_signal(signal.SIGKILL)
    rel.wait(proc)
    assert rel.committed_steps(workdir) == [3] and rel.unfinished_saves(workdir) == [writing]

    assert rel.run_to_end(workdir, {"train.num_steps": 7, "train.checkpoint_every": 3}) == 0
    out = rel.output(workdir)
    assert "removing unfinished checkpoint writes" in out and rel.resumed_steps(out) == [3]
    assert rel.unfinished_saves(workdir) == [] and rel.committed_steps(workdir) == [3, 6, 7]


def test_missing_data_file_is_a_clear_cli_error(tmp_path):
    done = run_cli(
        f"--workdir={tmp_path / 'run'}",
        *TINY_FLAGS,
        "--config.data.source=npz",
        "--config.data.path=/nonexistent/digits.npz",
    )
    assert done.returncode == 2 and "/nonexistent/digits.npz" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------
# damaged checkpoints
# ------------------------------------------------------------------------------------------------


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _small_state(value: float, step: int = 0):
    state = create_train_state({"w": jnp.full((8,), value)}, optax.sgd(0.1), 0)
    return state.replace(step=jnp.int32(step))


def test_truncated_newest_step_is_reported_and_the_previous_one_restored(tmp_path, caplog):
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, _small_state(1.0, 1), {"next_batch": 1}, {})
    checkpointer.save(2, _small_state(2.0, 2), {"next_batch": 2}, {})
    files = glob.glob(str(tmp_path / "2" / "state" / "**" / "d" / "*"), recursive=True)
    assert files
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)
    with caplog.at_level(logging.INFO, logger="diffjax"):
        restored = checkpointer.restore(_abstract(_small_state(0.0)))
    assert restored.step == 1 and restored.skipped == [2] and restored.data_state == {"next_batch": 1}
    np.testing.assert_array_equal(np.asarray(restored.state.params["w"]), np.full((8,), 1.0))
    assert "checkpoint at step 2 cannot be restored" in caplog.text
    checkpointer.close()


@pytest.mark.slow  # ~80 s; the Checkpointer-level test above runs by default
def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    train(tiny_config(num_steps=8), workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "8", "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)
    with caplog.at_level(logging.INFO, logger="diffjax"):
        summary = train(tiny_config(num_steps=12), workdir)
    assert summary["step"] == 12
    assert "checkpoint at step 8 cannot be restored" in caplog.text
    assert "resumed from the checkpoint at step 4" in caplog.text
    assert rel.committed_steps(workdir) == [4, 8, 12]
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
    rewritten = restore_final_state(tiny_config(), workdir)  # step 8 was written again on the way
    assert rewritten.step == 8 and rewritten.skipped == [] and int(rewritten.state.step) == 8


def test_checksums_catch_state_that_reads_back_different(tmp_path, caplog):
    """Orbax reads a swapped-in item without complaint; the checksums saved with the step do not match."""
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, _small_state(1.0, 1), {"next_batch": 1}, {})
    checkpointer.save(2, _small_state(2.0, 2), {"next_batch": 2}, {})
    shutil.copytree(tmp_path / "1" / "data", tmp_path / "2" / "data", dirs_exist_ok=True)
    restored = checkpointer.restore(_abstract(_small_state(0.0)))
    assert restored.step == 1 and restored.skipped == [2] and restored.data_state == {"next_batch": 1}
    assert "checkpoint at step 2 cannot be restored" in caplog.text and "data-iterator state differs" in caplog.text

    shutil.rmtree(tmp_path / "1" / "state")
    shutil.copytree(tmp_path / "2" / "state", tmp_path / "1" / "state")
    with pytest.raises(CheckpointError, match=r"steps \[1\] all failed"):
        checkpointer.restore(_abstract(_small_state(0.0)), step=1)
    assert "array(s) read back differ from their saved checksums" in caplog.text
    checkpointer.close()


def test_unfinished_save_is_no_step_and_is_removed_by_a_trainer(tmp_path, caplog):
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, _small_state(1.0, 1), None, {})
    checkpointer.close()
    shutil.copytree(tmp_path / "1", tmp_path / ("5" + rel.TMP_SUFFIX))  # what a killed save leaves
    reader = Checkpointer(str(tmp_path))
    assert reader.steps() == [1] and reader.latest_step() == 1
    reader.close()
    assert os.path.exists(tmp_path / ("5" + rel.TMP_SUFFIX))  # readers leave it alone
    trainer = Checkpointer(str(tmp_path), remove_unfinished=True)
    trainer.save(2, _small_state(2.0, 2), None, {})
    trainer.close()
    assert "removing unfinished checkpoint writes" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_nonfinite_parameters_are_never_saved(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    assert not checkpointer.save(1, _small_state(np.nan, 1), None, {})
    assert checkpointer.save(2, _small_state(1.0, 2), None, {})
    assert checkpointer.steps() == [2]
    checkpointer.close()


# ------------------------------------------------------------------------------------------------
# non-finite steps (injected NaN batches)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # default-run time: an end-to-end run of its own
def test_nonfinite_steps_are_skipped_counted_then_stop_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    config = tiny_config(num_steps=8, inject_nonfinite_at=(2, 5, 6), max_consecutive_nonfinite=2)
    with pytest.raises(TrainingStopped, match="stopping at step 6: 2 consecutive steps with non-finite") as stopped:
        train(config, workdir)
    # the diagnostic names the data: the injected batches are all NaN
    assert "non-finite input data (image: 1024 NaN, 0 inf of 1024 values)" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) == handler  # the stop handlers are uninstalled
    assert rel.committed_steps(workdir) == [4, 6]  # the stopping step was saved: its params are finite
    summary = train(config, workdir)  # the injected steps are behind: the restart completes
    assert summary["step"] == 8 and summary["skipped_steps"] == 3

    logged = {m["step"]: m["nonfinite"] for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}
    assert logged == {2: 1, 4: 0, 8: 0}


@pytest.mark.slow  # default-run time: an end-to-end run of its own
def test_stop_policy_stops_at_the_first_nonfinite_step(tmp_path):
    config = tiny_config(num_steps=4, inject_nonfinite_at=(3,), nonfinite_policy="stop")
    with pytest.raises(TrainingStopped, match="stopping at step 3: 1 consecutive"):
        train(config, str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------


def test_full_disk_is_refused_before_compiling(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(ConfigError, match=r"MiB free, but 4 checkpoint\(s\) of .* MiB need about"):
        train(tiny_config(), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before anything was created


def test_failed_checkpoint_write_is_a_checkpoint_error(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory), async_save=False)
    shutil.rmtree(directory)
    directory.write_text("not a directory")  # every write fails, as on a full or read-only disk
    with pytest.raises(CheckpointError, match="writing the checkpoint at step 1 to .* failed"):
        checkpointer.save(1, _small_state(1.0, 1), None, {})


def test_unwritable_checkpoint_directory(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("a file in the way")
    with pytest.raises(ConfigError, match="checkpoints' is not writable"):
        train(tiny_config(), str(workdir))
