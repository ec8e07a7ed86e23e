"""experiments/distill_mnist.py's pieces on a tiny randomly initialised unet-small teacher (no
checkpoint): one training step of each method and every NFE of its sampler, finite and image-shaped
(slow); a stopped training continued to the bit (one device; split over two: slow), data-parallel
training and sampling against one device (slow); a stopped table continued; argument checks."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed

from diffjax import distill as D
from diffjax import models
from diffjax import processes as P
from diffjax.training.sharding import replicated
from experiments import distill_mnist as M

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def teacher():
    model = models.create(
        "unet-small",
        image_size=8,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        num_head_channels=8,
        norm_groups=4,
    )
    apply, params = models.functional(model)
    return M.Teacher(lambda p, x, t: apply(p, x, t), params, P.EDM(), 0.5, SHAPE)


def options(out, **changes):
    args = M.parse_args(["--teacher", "unused", "--iterations", "1", "--batch-size", "4", "--regression-pairs", "4"])
    return argparse.Namespace(**{**vars(args), "sample_batch": 4, "pd_start_steps": 2, "out": str(out), **changes})


class Stop(Exception):
    pass


class Batches:
    """Random image batches with the pipeline's get_state/set_state; raises Stop before batch `stop_at`."""

    def __init__(self, stop_at=None):
        self.next_batch, self.stop_at = 0, stop_at

    def __next__(self):
        if self.next_batch == self.stop_at:
            raise Stop
        rng = np.random.default_rng(self.next_batch)
        self.next_batch += 1
        return {"image": rng.uniform(-1, 1, (4, *SHAPE)).astype(np.float32)}

    def get_state(self):
        return {"next_batch": self.next_batch}

    def set_state(self, state):
        self.next_batch = state["next_batch"]

    def close(self):
        pass


@pytest.mark.slow  # a U-Net training step compiled per method
@pytest.mark.parametrize("method, nfes", [("cd", (1, 2, 4)), ("pd", (1,)), ("scd", (1, 2, 4)), ("dmd+reg", (1,))])
def test_one_step_of_each_method_then_its_samplers(teacher, method, nfes, tmp_path):
    # scd: 10 iterations, so that its tangent warm-up (a tenth of them) reads the batch's step
    iterations = 10 if method == "scd" else 1
    trained, info = M.TRAINERS[method](teacher, options(tmp_path, iterations=iterations), Batches)
    assert np.isfinite(info["final_loss"] if method != "pd" else info["rounds"][-1]["final_loss"])
    generators = M.student_generators(method, teacher, trained)
    assert tuple(generators) == nfes
    for generate in generators.values():
        x = jax.jit(generate, static_argnums=1)(jax.random.key(0), 2)
        assert x.shape == (2, *SHAPE) and bool(jnp.all(jnp.isfinite(x)))


def test_scd_student_starts_as_the_teacher(teacher):
    """On TrigFlow (s = sd tan t, x_t = cos(t) x_s), `trigflow_net` at the teacher's weights gives the
    consistency function cos(t) x - sin(t) sd F = the teacher's EDM denoiser D(x / cos t, s), and sd F
    = the TrigFlow teacher's velocity, the identity sCM's tangent relies on. The weights are perturbed
    so that F depends on x and t (a fresh U-Net outputs zeros), which a wrong sign or noise level breaks."""
    params = perturbed(teacher.params, seed=1)
    changed = M.Teacher(teacher.net, params, teacher.process, teacher.sigma_data, SHAPE)
    trig, net, sd = M.trigflow_process(changed), M.trigflow_net(changed), changed.sigma_data
    np.testing.assert_allclose(sd * np.tan([trig.t_min, trig.t_max]), [0.002, 80.0], rtol=1e-6)

    t = jnp.array([0.05, 0.7, 1.3, 1.56])
    x = jax.random.normal(jax.random.key(2), (4, *SHAPE))
    cos = jnp.cos(t)[:, None, None, None]
    consistency = D.TrigFlowConsistency(lambda y, u: net(params, y, u), sd)(x, t)
    edm = changed.denoiser().x0(x / cos, sd * jnp.tan(t))
    assert float(jnp.std(net(params, x / sd, t))) > 0.1  # F is not zero: the identity tests something
    np.testing.assert_allclose(consistency, edm, rtol=1e-4, atol=1e-4)

    velocity = M.trigflow_teacher(changed, params).velocity(x, t)
    np.testing.assert_allclose(velocity, sd * net(params, x / sd, t), rtol=1e-4, atol=1e-4)


def test_a_stopped_training_continues_as_if_never_stopped(teacher, tmp_path):
    """cd for 4 steps straight, and stopped before its 4th batch (checkpoints every 2 steps) then run
    again: the same EMA parameters to the bit (they depend on every step's batch, noise and optimizer
    state). A checkpoint of other settings is refused."""
    straight, _ = M.train_cd(teacher, options(tmp_path / "straight", iterations=4, checkpoint_every=2), Batches)
    args = options(tmp_path / "stopped", iterations=4, checkpoint_every=2)
    with pytest.raises(Stop):
        M.train_cd(teacher, args, lambda: Batches(stop_at=3))
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints" / "cd")) == ["2"]
    continued, info = M.train_cd(teacher, args, Batches)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(continued)):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(info["final_loss"]) and info["seconds"] > 0
    with pytest.raises(SystemExit, match="lr"):
        M.train_cd(teacher, options(tmp_path / "stopped", iterations=4, checkpoint_every=2, lr=1e-3), Batches)


@pytest.mark.slow  # two U-Net training steps and a sampler compiled on one device and on two
def test_data_parallel_training_and_sampling_match_one_device(teacher, tmp_path):
    """A teacher replicated on a 2-device mesh: its students train on batches split over the devices
    and sample split over them, with the results of one device (float tolerance: sums are split);
    a training stopped after its first step and continued gives the uninterrupted result to the bit."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    params = perturbed(teacher.params, seed=3)  # a fresh U-Net outputs zeros
    alone = M.Teacher(teacher.net, params, teacher.process, 0.5, SHAPE)
    placed = M.Teacher(teacher.net, jax.device_put(params, replicated(mesh)), teacher.process, 0.5, SHAPE)
    assert alone.batch_sharding is None and placed.batch_sharding.spec == jax.sharding.PartitionSpec("data")
    args = {"iterations": 2, "lr": 1e-2}  # a large step: the second loss shows the first
    one, one_info = M.train_cd(alone, options(tmp_path / "one", **args), Batches)
    split, split_info = M.train_cd(placed, options(tmp_path / "split", **args), Batches)
    assert jax.tree.leaves(split)[0].sharding.mesh == mesh
    np.testing.assert_allclose(split_info["final_loss"], one_info["final_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(split)):  # Adam moves a parameter by up to lr a step
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2 * args["lr"])
    stopped = options(tmp_path / "stopped", **args, checkpoint_every=1)
    with pytest.raises(Stop):
        M.train_cd(placed, stopped, lambda: Batches(stop_at=1))
    continued, _ = M.train_cd(placed, stopped, Batches)
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(continued)):
        np.testing.assert_array_equal(a, b)
    generate = M.cd_generator(alone, params, 2)
    images = M.generate_images(generate, 8, jax.random.key(0), 4, "one")
    images_split = M.generate_images(generate, 8, jax.random.key(0), 4, "split", placed.batch_sharding)
    assert images.std() > 10 and np.abs(images.astype(int) - images_split).max() <= 1


def test_a_stopped_table_keeps_its_rows_and_refuses_other_settings(tmp_path):
    args = M.parse_args(["--teacher", "t", "--methods", "cd", "--results-dir", str(tmp_path), "--name", "table"])

    def meta(**changes):  # a tuple and a float: compared after a JSON round trip
        return {
            "samples": 2000,
            "lr": 5e-5,
            "sigmas": (0.821,),
            "methods": ["cd"],
            "teacher_row": False,
            "teacher": "work/mnist",
            "teacher_crc32": 12345,
            **changes,
        }

    assert M.previous_results(args, meta()) == ([], {})
    rows, training = [{"method": "cd", "nfe": 1}], {"cd": {"seconds": 5.0}}
    M.write_results("table", {"meta": meta(), "rows": rows, "training": training}, directory=str(tmp_path))
    more = meta(methods=["pd"], teacher_row=True, teacher="/elsewhere/mnist.msgpack")  # the same weights, moved
    assert M.previous_results(args, more) == (rows, training)
    assert more["methods"] == ["cd", "pd"] and more["teacher_row"]  # the table holds the rows of both
    with pytest.raises(SystemExit, match="samples: 2000 -> 500"):
        M.previous_results(args, meta(samples=500))
    with pytest.raises(SystemExit, match="teacher_crc32: 12345 -> 6789"):
        M.previous_results(args, meta(teacher_crc32=6789))


def test_the_rows_each_method_makes():
    assert M.method_nfes("pd", 16) == (1, 2, 4) and M.method_nfes("pd", 2) == (1,)
    assert M.method_nfes("cd", 2) == (1, 2, 4) and M.method_nfes("dmd+reg", 2) == (1,)
    assert M.rows_expected({"teacher_row": True, "methods": ["cd", "pd", "dmd+reg"], "pd_start_steps": 4}) == 7


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        M.parse_args(["--teacher", "t", "--methods", "cd,lcm"])
    with pytest.raises(SystemExit):
        M.parse_args(["--teacher", "t", "--pd-start-steps", "12"])
    assert M.parse_args(["--teacher", "t", "--methods", "cd,pd,cd"]).methods == ["cd", "pd"]
    assert M.mean_stderr([1.0, 3.0]) == (2.0, 1.0)
