"""Power-function EMA and post-hoc EMA (EDM2): the profiles against their closed forms, the
reconstruction against its Cauchy-Schwarz bound, and a trained run whose directly tracked EMA is
reconstructed from its snapshots."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate

from diffjax.training import posthoc_ema as ph
from diffjax.training.state import create_train_state, ema, make_train_step


def test_sigma_rel_and_gamma_convert_both_ways_with_the_papers_values():
    # EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert ph.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert ph.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for gamma in (0.5, 3.0, 6.94, 40.0, 500.0):
        assert ph.sigma_rel_to_gamma(float(ph.gamma_to_sigma_rel(gamma))) == pytest.approx(gamma, rel=1e-9)
    # the widest profile: sigma_rel(gamma) peaks where gamma^2 + 3 gamma + 1 = 0
    grid = np.linspace(-0.99, 5, 200_001)
    assert ph.MAX_SIGMA_REL == pytest.approx(ph.gamma_to_sigma_rel(grid).max(), rel=1e-9)
    for bad in (0.0, -0.1, ph.MAX_SIGMA_REL, 1.0, math.nan):
        with pytest.raises(ValueError, match="sigma_rel"):
            ph.sigma_rel_to_gamma(bad)
    with pytest.raises(TypeError, match="sigma_rel"):
        ph.sigma_rel_to_gamma("0.1")


@pytest.mark.parametrize("sigma_rel", [0.05, 0.2])
def test_power_ema_is_the_explicit_weighted_sum(sigma_rel):
    """avg_t = sum_i w_i theta_i with w_i = (i^(g+1) - (i-1)^(g+1)) / t^(g+1), and these weights are
    the products (1 - beta_i) prod_{j>i} beta_j of the decays."""
    gamma, steps = ph.sigma_rel_to_gamma(sigma_rel), 60
    thetas = np.random.default_rng(0).normal(size=(steps, 5)).astype(np.float32)
    average = ph.power_ema(sigma_rel)
    update = jax.jit(average.update)
    avg = average.init(jnp.zeros(5))
    for i in range(steps):
        avg = update(avg, jnp.asarray(thetas[i]), jnp.int32(i))
    weights = ph.power_ema_weights(gamma, steps)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(avg), weights @ thetas.astype(np.float64), rtol=0, atol=2e-6)
    beta = np.asarray([float(ph.power_ema_decay(gamma, t)) for t in range(1, steps + 1)], np.float64)
    products = np.asarray([(1 - beta[i]) * np.prod(beta[i + 1 :]) for i in range(steps)])
    np.testing.assert_allclose(products, weights, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.1, 0.25])
def test_profile_width_is_sigma_rel(sigma_rel):
    """The standard deviation of the step weights, over the run's length, is sigma_rel (up to the
    O(1/t) of unit steps)."""
    steps = 100_000
    weights = ph.power_ema_weights(ph.sigma_rel_to_gamma(sigma_rel), steps)
    position = (np.arange(1, steps + 1) - 0.5) / steps
    mean = weights @ position
    assert math.sqrt(weights @ (position - mean) ** 2) == pytest.approx(sigma_rel, rel=1e-4)


def test_profile_inner_products_match_quadrature():
    def profile(gamma, t):
        return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else 0.0

    for ga, ta, gb, tb in [(6.94, 100.0, 16.97, 100.0), (6.94, 40.0, 16.97, 100.0), (2.0, 300.0, 0.5, 120.0)]:
        expected = integrate.quad(lambda x: profile(ga, ta)(x) * profile(gb, tb)(x), 0, min(ta, tb), limit=200)[0]
        assert ph.power_profile_inner(ga, ta, gb, tb) == pytest.approx(expected, rel=1e-7)
        assert ph.power_profile_inner(gb, tb, ga, ta) == pytest.approx(expected, rel=1e-12)


def _tracked_snapshots(workdir, thetas, sigma_rels, every):
    """The power EMAs of the trajectory `thetas` (float32, as training runs them), saved every
    `every` steps as post-hoc snapshots; returns the averages at the end."""
    averages = [ph.power_ema(s) for s in sigma_rels]
    update = jax.jit(lambda avgs, p, step: [a.update(x, p, step) for a, x in zip(averages, avgs)])
    state = [a.init({"w": jnp.zeros(thetas.shape[1:])}) for a in averages]
    for i in range(thetas.shape[0]):
        state = update(state, {"w": jnp.asarray(thetas[i])}, jnp.int32(i))
        if (i + 1) % every == 0:
            ph.save_snapshot(str(workdir), i + 1, sigma_rels, jax.device_get(state))
    return state


def test_reconstruction_is_within_its_bound_and_exact_for_a_tracked_profile(tmp_path):
    rng = np.random.default_rng(1)
    steps, sigma_rels = 400, (0.05, 0.1)
    thetas = np.cumsum(rng.normal(size=(steps, 32)), axis=0).astype(np.float32)  # a random walk
    tracked = _tracked_snapshots(tmp_path, thetas, sigma_rels, every=40)
    assert ph.snapshot_steps(str(tmp_path)) == list(range(40, 401, 40))

    # a tracked profile at a snapshot step: the solution is that snapshot alone
    flat, solution = ph.reconstruct_posthoc_ema(str(tmp_path), 0.1)
    direct = np.asarray(tracked[1]["w"])
    assert solution.relative_residual < 1e-6
    np.testing.assert_allclose(flat["['w']"], direct, rtol=0, atol=1e-6 * np.abs(direct).max())

    # an untracked width: within ||combined profile - target profile|| * ||theta||_L2 of the exact EMA
    for sigma_rel, step in [(0.075, 400), (0.15, 400), (0.075, 240)]:
        flat, solution = ph.reconstruct_posthoc_ema(str(tmp_path), sigma_rel, step=step)
        exact = ph.power_ema_weights(ph.sigma_rel_to_gamma(sigma_rel), step) @ thetas[:step].astype(np.float64)
        bound = solution.residual * np.sqrt((thetas[:step].astype(np.float64) ** 2).sum(0)) + 1e-4
        error = np.abs(flat["['w']"] - exact)
        assert np.all(error <= bound), (sigma_rel, step, (error / bound).max())
        # and far closer than the nearest tracked width would be
        nearest = ph.power_ema_weights(ph.sigma_rel_to_gamma(0.1), step) @ thetas[:step].astype(np.float64)
        assert error.max() < 0.2 * np.abs(nearest - exact).max()
    with pytest.raises(ValueError, match="step=10"):
        ph.reconstruct_posthoc_ema(str(tmp_path), 0.1, step=10)


def test_the_train_step_tracks_power_emas_of_the_trained_leaves_only(tmp_path):
    """The tracked profiles follow the closed form of the trained parameters' trajectory, frozen
    leaves stay as they are, and the directly tracked sigma_rel 0.2 is what its snapshots give back."""

    def loss(params, key, batch):
        del key
        return jnp.sum((params["a"] - batch) ** 2) + jnp.sum((params["b"] - batch) ** 2), {}

    optimizer, sigma_rels = optax.sgd(0.05), (0.05, 0.2)
    tracked = tuple(ph.power_ema(s) for s in sigma_rels)
    params = {"a": jnp.zeros(3), "b": jnp.ones(3)}
    trainable = {"a": True, "b": False}
    state = create_train_state(params, optimizer, 0, average=ema(0.9), trainable=trainable, tracked=tracked)
    step = jax.jit(make_train_step(loss, optimizer, ema(0.9), trainable=trainable, tracked=tracked))
    trajectory = []
    for i in range(12):
        state, _ = step(state, jnp.full(3, float(i)))
        trajectory.append(np.asarray(state.params["a"], np.float64))
        if (i + 1) % 3 == 0:
            ph.save_snapshot(str(tmp_path), i + 1, sigma_rels, jax.device_get(state.tracked_averages))
    for sigma_rel, average in zip(sigma_rels, state.tracked_averages):
        weights = ph.power_ema_weights(ph.sigma_rel_to_gamma(sigma_rel), 12)
        np.testing.assert_allclose(average["a"], weights @ np.stack(trajectory), rtol=1e-5)
        np.testing.assert_array_equal(average["b"], params["b"])
    flat, _ = ph.reconstruct_posthoc_ema(str(tmp_path), 0.2)
    np.testing.assert_allclose(flat["['a']"], state.tracked_averages[1]["a"], rtol=1e-6)
    with pytest.raises(ValueError, match="tracks 2 averages"):
        make_train_step(loss, optimizer, ema(0.9), trainable=trainable)(state, jnp.zeros(3))


@pytest.mark.slow
def test_training_reconstructs_its_directly_tracked_ema(tmp_path, capsys):
    """The Must-show: a run tracking sigma_rel 0.05 and 0.1 (snapshots every 2 steps); the 0.1 EMA
    reconstructed from the snapshots by the command equals the one tracked in the final checkpoint."""
    from test_training import smallest_config

    from diffjax.training import train
    from diffjax.training.load import restore_run

    config = smallest_config(num_steps=6, checkpoint_every=3, posthoc_ema=(0.05, 0.1), posthoc_ema_every=2)
    workdir = str(tmp_path / "run")
    train(config, workdir)
    assert ph.snapshot_steps(workdir) == [2, 4, 6]
    out = str(tmp_path / "ema.npz")
    assert ph.main(["--workdir", workdir, "--sigma_rel", "0.1", "--out", out]) == 0
    assert "relative profile residual" in capsys.readouterr().out
    _, restored = restore_run(workdir)
    assert int(restored.state.step) == 6
    tracked = restored.state.tracked_averages[1]
    with np.load(out) as z:
        reconstructed = ph.params_like(tracked, dict(z))
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tracked))
    pairs = zip(jax.tree.leaves(reconstructed), jax.tree.leaves(tracked))
    assert max(float(jnp.abs(a - b).max()) for a, b in pairs) <= 1e-6 * scale
    # the two profiles differ: the check above could fail
    other = restored.state.tracked_averages[0]
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(tracked))) > 1e-4


@pytest.mark.parametrize(
    "key, value",
    [
        ("posthoc_ema", (0.05, 0.5)),  # wider than any power profile
        ("posthoc_ema", (0.1, 0.1)),
        ("posthoc_ema", 0.1),
        ("posthoc_ema", (0.0,)),
        ("posthoc_ema_every", -1),
        ("posthoc_ema_every", 2.5),
    ],
)
def test_bad_posthoc_config_names_the_key(key, value):
    from test_training import tiny_config

    from diffjax.training import ConfigError, validate_config

    config = tiny_config()
    with config.train.ignore_type():
        config.train[key] = value
    with pytest.raises(ConfigError, match=f"config.train.{key} = "):
        validate_config(config)


def test_checkpoints_keep_the_tracked_averages_and_older_checkpoints_still_restore(tmp_path):
    """A state with tracked profiles round-trips; one written before TrainState had the field (the
    same fields less tracked_averages) restores into today's state with none."""
    import dataclasses

    import flax.struct

    from diffjax.training.checkpoint import Checkpointer
    from diffjax.training.state import TrainState

    names = [f.name for f in dataclasses.fields(TrainState) if f.name != "tracked_averages"]
    former = flax.struct.dataclass(type("FormerTrainState", (), {"__annotations__": dict.fromkeys(names, "Any")}))
    tracked = (ph.power_ema(0.05), ph.power_ema(0.1))
    state = create_train_state({"w": jnp.arange(4.0)}, optax.sgd(0.1), 0, tracked=tracked)
    state = state.replace(tracked_averages=(state.params, {"w": jnp.full(4, 2.0)}))
    plain = create_train_state({"w": jnp.arange(4.0)}, optax.sgd(0.1), 0)
    checkpointer = Checkpointer(str(tmp_path / "tracked"), async_save=False)
    checkpointer.save(1, state, None, {})
    restored = checkpointer.restore(jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored.state.tracked_averages[1]["w"], np.full(4, 2.0))
    checkpointer.close()
    checkpointer = Checkpointer(str(tmp_path / "former"), async_save=False)
    checkpointer.save(1, former(**{name: getattr(plain, name) for name in names}), None, {})
    restored = checkpointer.restore(jax.eval_shape(lambda: plain))
    assert restored.skipped == [] and restored.state.tracked_averages == ()
    np.testing.assert_array_equal(restored.state.params["w"], np.arange(4.0))
    checkpointer.close()


def test_bfloat16_averages_are_saved_exactly(tmp_path):
    average = {"w": jnp.asarray([0.1, -3.0, 7.5], jnp.bfloat16)}
    ph.save_snapshot(str(tmp_path), 5, (0.1,), [jax.device_get(average)])
    flat, _ = ph.reconstruct_posthoc_ema(str(tmp_path), 0.1)
    np.testing.assert_array_equal(flat["['w']"], np.asarray(average["w"], np.float32))
    restored = ph.params_like(average, flat)
    assert restored["w"].dtype == jnp.bfloat16 and bool(jnp.all(restored["w"] == average["w"]))


def test_resuming_with_other_tracked_widths_is_refused_by_name():
    """The train state holds one average per width: a checkpoint is resumed only with the same ones
    (and runs without post-hoc EMA keep their former compatibility record)."""
    from test_training import tiny_config

    from diffjax.training import CheckpointError
    from diffjax.training.run import check_compatible, config_compatibility

    plain = tiny_config()
    assert "train.posthoc_ema" not in config_compatibility(plain)
    tracked = tiny_config(posthoc_ema=(0.05, 0.1))
    saved = {"compatibility": config_compatibility(tracked)}
    check_compatible("ckpt", 4, saved, {"compatibility": config_compatibility(tiny_config(posthoc_ema=(0.05, 0.1)))})
    for other in (plain, tiny_config(posthoc_ema=(0.05, 0.2))):
        with pytest.raises(CheckpointError, match=r"train\.posthoc_ema"):
            check_compatible("ckpt", 4, saved, {"compatibility": config_compatibility(other)})


def test_the_command_reports_bad_input_clearly(tmp_path, capsys):
    out = str(tmp_path / "out.npz")
    with pytest.raises(SystemExit):
        ph.main(["--workdir", str(tmp_path), "--sigma_rel", "0.1", "--out", out])
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    ph.save_snapshot(str(tmp_path), 3, (0.1,), [{"w": np.ones(2, np.float32)}])
    with pytest.raises(SystemExit):
        ph.main(["--workdir", str(tmp_path), "--sigma_rel", "0.4", "--out", out])
    assert "sigma_rel=0.4: must be in (0, 0.3003)" in capsys.readouterr().err
    assert not os.path.exists(out)
