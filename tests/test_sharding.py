"""Sharded training on CPU meshes (8 virtual devices): same numbers as one device, parameters
sharded as the rules say, checkpoints restored onto another mesh, several processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST_COMPILE_XLA_FLAGS, REPO
from jax.sharding import PartitionSpec
from test_training import SMALLEST_FLAGS, restore_final_state, smallest_config

from diffjax.training import sharding as shard_lib
from diffjax.training import train


def mesh_config(shape, num_steps):
    """smallest_config on a mesh: its parameters carry every logical axis the rules map (conv
    channels, embeddings, attention heads in the middle block, norms)."""
    config = smallest_config(num_steps=num_steps)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    config.sample.num_samples = 8
    return config


def final_state(config, workdir, devices):
    restored = restore_final_state(config, workdir, devices)
    return restored, restored.run


def losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single"))
    config = mesh_config((1, 1, 1), 4)
    train(config, workdir, devices=jax.devices()[:1])
    restored, _ = final_state(config, workdir, jax.devices()[:1])
    return workdir, restored


def assert_same_training(reference, other):
    (ref_dir, ref), (dir_, got) = reference, other
    np.testing.assert_allclose(losses(dir_), losses(ref_dir), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(got.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-6)
    assert ref.data_state == got.data_state


# (2, 2, 2) exercises all three axes at once and runs by default; the one-axis meshes are slow tests.
ONE_AXIS_MESHES = [pytest.param(shape, marks=pytest.mark.slow) for shape in [(8, 1, 1), (2, 4, 1), (1, 8, 1)]]


@pytest.mark.xdist_group("single_device_run")
@pytest.mark.parametrize("shape", [*ONE_AXIS_MESHES, (2, 2, 2)], ids=str)
def test_mesh_training_matches_one_device(shape, single_device_run, tmp_path):
    workdir = str(tmp_path / "mesh")
    config = mesh_config(shape, 4)
    train(config, workdir)
    restored, run = final_state(config, workdir, None)
    assert dict(run.mesh.shape) == dict(zip(shard_lib.MESH_AXES, shape))
    assert_same_training(single_device_run, (workdir, restored))
    check_param_shardings(restored.state.params, run)


def check_param_shardings(params, run):
    """Each parameter is sharded exactly as the rules map its logical axes, and on a mesh with
    fsdp or tensor axes most parameters are sharded."""
    rules = run.rules
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_specs = jax.tree.leaves(run.spec.logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    sharded = 0
    for (path, array), logical in zip(flat_params, flat_specs):
        want = shard_lib.logical_to_mesh(logical, array.shape, run.mesh, rules)
        assert array.sharding.spec == want, (jax.tree_util.keystr(path), array.sharding.spec, want)
        sharded += any(axes is not None for axes in want)
    if run.mesh.shape["fsdp"] > 1 or run.mesh.shape["tensor"] > 1:
        assert sharded > len(flat_params) // 2, f"only {sharded} of {len(flat_params)} parameters sharded"


def test_logical_to_mesh_rules():
    mesh = shard_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shard_lib.make_rules()
    assert shard_lib.logical_to_mesh(PartitionSpec("embed", "mlp"), (8, 16), mesh, rules) == PartitionSpec(
        "fsdp", "tensor"
    )
    # not divisible: replicated
    assert shard_lib.logical_to_mesh(PartitionSpec("embed", "mlp"), (3, 16), mesh, rules) == PartitionSpec(
        None, "tensor"
    )
    # the same mesh axis is used once per array; trailing unsharded dimensions are left out
    assert shard_lib.logical_to_mesh(PartitionSpec("embed", "conv_out"), (8, 8), mesh, rules) == PartitionSpec("fsdp")
    rules = shard_lib.make_rules({"embed": ["tensor"], "mlp": []})
    assert shard_lib.logical_to_mesh(PartitionSpec("embed", "mlp"), (8, 16), mesh, rules) == PartitionSpec("tensor")
    assert shard_lib.logical_to_mesh(PartitionSpec(None, "mlp"), (3, 5), mesh, rules) == PartitionSpec()
    with pytest.raises(ValueError, match="unknown mesh axes"):
        shard_lib.make_rules({"embed": ["model"]})


def test_mesh_shape_resolution_and_errors():
    assert shard_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        shard_lib.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="do not divide"):
        shard_lib.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


@pytest.mark.xdist_group("single_device_run")
@pytest.mark.slow  # default-run time: an end-to-end run of its own
def test_checkpoint_restores_onto_a_different_mesh(single_device_run, tmp_path):
    """Saved with fsdp=8 after 2 steps, resumed with data=2, fsdp=4 for 2 more: the same as 4
    steps on one device."""
    workdir = str(tmp_path / "remesh")
    train(mesh_config((1, 8, 1), 2), workdir)
    config = mesh_config((2, 4, 1), 4)
    train(config, workdir)
    restored, _ = final_state(config, workdir, None)
    assert_same_training(single_device_run, (workdir, restored))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(workdir, num_steps, port):
    devices = "--xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=f"{devices} {FAST_COMPILE_XLA_FLAGS}", JAX_PLATFORMS="cpu")
    flags = [
        *SMALLEST_FLAGS,
        f"--config.train.num_steps={num_steps}",
        "--config.sample.num_samples=8",
        "--config.mesh.data=-1",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, "experiments", "main.py"),
                f"--workdir={workdir}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *flags,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.mark.slow  # ~100 s: two fresh processes compile and checkpoint twice
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    """2 processes x 4 CPU devices: train 2 steps, stop, resume to 4; equals the single-process
    run on 8 devices (same global batches, parameters and data position)."""
    workdir = str(tmp_path / "multihost")
    run_processes(workdir, 2, free_port())
    outputs = run_processes(workdir, 4, free_port())
    assert any("resumed from the checkpoint at step 2" in out for out in outputs)

    reference = str(tmp_path / "reference")
    config = mesh_config((8, 1, 1), 4)
    config.train.checkpoint_every = 4
    train(config, reference)
    ref, _ = final_state(config, reference, None)
    got, _ = final_state(config, workdir, None)
    assert got.step == 4
    for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(got.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-6)
    assert ref.data_state == got.data_state
    np.testing.assert_allclose(losses(workdir), losses(reference), rtol=2e-5)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_per_shard_flash_attention_matches_reference(impl):
    """Under a mesh, the Pallas kernel runs per (batch, head) shard inside shard_map: values and
    gradients equal the plain-JAX reference."""
    from diffjax import kernels

    if impl == "pallas_tpu":
        # TPU interpret mode synchronizes the devices it simulates, which deadlocks when XLA:CPU
        # does not run all per-device programs at once (seen with 8 devices on 2 cores): 2 devices
        devices = jax.devices()[:2]
        mesh = shard_lib.create_mesh({"data": 1, "fsdp": 1, "tensor": 2}, devices)
        spec = PartitionSpec(None, None, "tensor", None)
    else:
        mesh = shard_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (8, 24, 4, 16)) for key in keys[:3])
    mask = jax.random.bernoulli(keys[3], 0.8, (8, 24)).at[:, 0].set(True)
    on_mesh = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731

    def loss(q, k, v, impl):
        out = kernels.flash_attention(
            q, k, v, mask=mask, implementation=impl, interpret=impl != "xla", partition_spec=spec
        )
        return jnp.sum(out**2), out

    sharded = jax.jit(
        shard_lib.traced_under_mesh(
            jax.value_and_grad(lambda q, k, v: loss(q, k, v, impl), argnums=(0, 1, 2), has_aux=True),
            mesh,
            shard_lib.make_rules(),
        )
    )
    # wait for the sharded program before running others: XLA:CPU's in-process collectives can
    # deadlock when a second program is dispatched while one with collectives is in flight
    (_, out), grads = jax.block_until_ready(sharded(on_mesh(q), on_mesh(k), on_mesh(v)))
    (_, ref_out), ref_grads = jax.value_and_grad(lambda q, k, v: loss(q, k, v, "xla"), argnums=(0, 1, 2), has_aux=True)(
        q, k, v
    )
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shard only batch"):
        jax.jit(
            shard_lib.traced_under_mesh(
                lambda q: kernels.flash_attention(
                    q, q, q, implementation="pallas_tpu", interpret=True, partition_spec=PartitionSpec(None, "data")
                ),
                mesh,
                shard_lib.make_rules(),
            )
        )(on_mesh(q))


def test_sharded_dit_train_step_lowers_for_tpu():
    """TPU readiness without a TPU: the full train step of DiT-B/2 (32x32x4 latents, bf16, class
    labels) with the Pallas TPU attention kernel, sharded over a (2, 2, 2) mesh by the rules,
    exports for TPU."""
    import optax
    from flax import nnx

    from diffjax import VP, denoising_loss, models
    from diffjax.training.state import create_train_state, ema, make_train_step

    mesh = shard_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shard_lib.make_rules()
    config = models.get_config(
        "DiT-B/2", image_size=32, in_channels=4, num_classes=1000, attention_impl="pallas_tpu", dtype="bfloat16"
    )
    abstract = nnx.eval_shape(lambda: models.build(config))
    apply, abstract_params = models.functional(abstract)
    loss_fn = denoising_loss(apply, VP(), prediction="eps", cond_keys={"y": "label"})
    optimizer = optax.adamw(1e-4)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, optimizer, 0), abstract_params)
    params_sharding = shard_lib.param_shardings(abstract_params, models.logical_partition_specs(abstract), mesh, rules)
    state_sharding = shard_lib.state_shardings(abstract_state, params_sharding, optimizer, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
    )
    batch = {
        "image": jax.ShapeDtypeStruct((32, 32, 32, 4), jnp.float32, sharding=shard_lib.batch_sharding(mesh, 4)),
        "label": jax.ShapeDtypeStruct((32,), jnp.int32, sharding=shard_lib.batch_sharding(mesh, 1)),
    }
    step = jax.jit(
        shard_lib.traced_under_mesh(make_train_step(loss_fn, optimizer, ema(0.999)), mesh, rules),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )
    exported = jax.export.export(step, platforms=["tpu"])(state, batch)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",) and exported.nr_devices == 8
    assert text.count("tpu_custom_call") >= 3  # attention forward + the two backward kernels
    # parameters arrive sharded as the rules say (FSDP over "fsdp", MLP/heads over "tensor")
    flat = jax.tree.leaves(params_sharding)
    assert sum(not s.is_fully_replicated for s in flat) > len(flat) // 2
    mlp_in = params_sharding["blocks"]["fc1"]["kernel"].spec
    assert mlp_in == PartitionSpec(None, "fsdp", "tensor"), mlp_in


def test_a_jitted_step_on_placed_parameters_compiles_once():
    """Parameters placed by the rules (e.g. by load_run) and a fresh train state around them: the step's
    output has the shardings of its input, so the second and third calls reuse the first compilation
    (replicated specs are written P(), as jit returns them, and the fresh counters lie on the mesh)."""
    import optax

    from diffjax.training.state import create_train_state, ema, make_train_step

    mesh = shard_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = shard_lib.make_rules()
    place = shard_lib.placement(mesh, rules)
    assert place(PartitionSpec("embed", None), (3, 4)).spec == PartitionSpec()  # 3 rows: not sharded
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
    params = {k: jax.device_put(v, place(PartitionSpec(), v.shape)) for k, v in params.items()}
    optimizer = optax.adam(1e-2)

    def loss_fn(p, key, batch):
        return jnp.sum((batch["x"] @ p["w"] + p["b"]) ** 2), {}

    state = create_train_state(params, optimizer, 0, average=ema(0.9))
    step = jax.jit(make_train_step(loss_fn, optimizer, ema(0.9)))
    batch = {"x": jnp.ones((8, 3))}
    for _ in range(3):
        state, _ = step(state, batch)
    assert int(state.step) == 3
    assert step._cache_size() == 1
