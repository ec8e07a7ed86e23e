"""Train, sample and evaluate from a config, with automatic resumption.

`train(config, workdir)` validates everything first (config keys and values, the work directory,
the data files, the model against the data, the sampler), then builds a sharded train state
(or restores the newest checkpoint in workdir/checkpoints together with the input pipeline's
position), and runs the jitted train step with progress bar, metrics (stdout, JSONL,
TensorBoard), checkpoints and sample grids. Everything the run writes is in `workdir`:

    checkpoints/<step>/     orbax checkpoints (state, data-iterator state, metadata)
    metrics.jsonl           one line per logged step
    tensorboard/            event files
    samples/step_<n>.png    sample grids (EMA parameters)
    summary.json            the final metrics of the last run

Faults: SIGTERM/SIGINT (from the start of `train`) finish the current step, save a checkpoint and
return; a save killed half-way leaves the previous checkpoints intact (see checkpoint.py); a
damaged checkpoint is reported and an older one used; non-finite steps are skipped or stop the
run (train.nonfinite_policy); an unwritable or too full work directory, missing data files and a
checkpoint from an incompatible config are reported before anything is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import diffjax
from diffjax import data as data_lib
from diffjax.training import sharding as shard_lib
from diffjax.training.build import (
    ModelSpec,
    build_loss,
    build_model_spec,
    build_process,
    check_sampling_config,
    label_dropout_transform,
    make_sample_fn,
)
from diffjax.training.checkpoint import CheckpointError, Checkpointer
from diffjax.training.config import ConfigError, check_free_space, check_workdir, validate_config
from diffjax.training.images import save_image_grid, to_uint8
from diffjax.training.metrics import MetricWriter
from diffjax.training.state import (
    TrainState,
    create_train_state,
    make_learning_rate,
    make_optimizer,
    make_train_step,
)

__all__ = ["train", "sample_from_checkpoint", "evaluate", "Run", "prepare_run", "TrainingStopped"]

log = logging.getLogger("diffjax")

# Config sections that must match for a checkpoint to be resumed.
COMPATIBILITY_KEYS = ("process", "model", "loss.prediction", "loss.sigma_data", "data.image_size", "data.channels")


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite policy); the message says why."""


# ------------------------------------------------------------------------------------------------
# run set-up
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything built from a config, before any state exists."""

    config: Any
    workdir: str
    data_info: Any
    process: diffjax.GaussianProcess
    spec: ModelSpec
    mesh: jax.sharding.Mesh
    optimizer: Any
    learning_rate: Callable
    abstract_state: TrainState
    state_sharding: TrainState
    checkpointer: Checkpointer
    rules: dict

    def under_mesh(self, fn: Callable) -> Callable:
        """fn traced under this run's mesh and logical axis rules."""
        return shard_lib.traced_under_mesh(fn, self.mesh, self.rules)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data_info.image_shape)

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    def metadata(self) -> dict:
        return {
            "diffjax_version": diffjax.__version__,
            "config": json.loads(self.config.to_json_best_effort()),
            "compatibility": compatibility_fingerprint(self.config),
            "num_params": self.spec.num_params,
        }


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value.to_dict() if hasattr(value, "to_dict") else value


def compatibility_fingerprint(config) -> dict:
    """The config values a checkpoint must agree with, in JSON form (tuples become lists)."""
    return json.loads(json.dumps({key: _get(config, key) for key in COMPATIBILITY_KEYS}, default=str))


def prepare_run(config, workdir: str, devices=None, *, training: bool = False) -> Run:
    """Validate and build every piece of a run; raises ConfigError before anything is compiled.

    devices: the devices of the mesh (default: every device of every process).
    training: also check the free disk space for checkpoints and remove unfinished saves."""
    validate_config(config)
    workdir = check_workdir(workdir)
    check_workdir(os.path.join(workdir, "checkpoints"))
    data_info = data_lib.dataset_info(config.data)  # missing files, bad image size: clear errors
    process = build_process(config)
    spec = build_model_spec(config, data_info, process)
    build_loss(config, spec, process)  # validates the loss options
    try:
        mesh = shard_lib.create_mesh(config.mesh, devices)
        rules = shard_lib.make_rules(
            {name: [a for a in str(axes).split(",") if a] for name, axes in config.mesh.rules.items()}
        )
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from err
    _check_batch_divisibility(config, mesh)
    check_sampling_config(config, process, spec, tuple(data_info.image_shape))

    num_steps = int(config.train.num_steps)
    optimizer = make_optimizer(config.optim, num_steps)
    abstract_state = jax.eval_shape(lambda: create_train_state(spec.init_params(), optimizer, config.seed))
    params_sharding = shard_lib.param_shardings(spec.abstract_params, spec.logical_specs, mesh, rules)
    state_sharding = shard_lib.state_shardings(abstract_state, params_sharding, optimizer, mesh)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(config.train.keep_checkpoints),
        async_save=bool(config.train.async_checkpointing),
        remove_unfinished=training,
    )
    if training:
        try:
            _check_checkpoint_space(checkpointer, abstract_state, int(config.train.keep_checkpoints))
        except ConfigError:
            checkpointer.close()
            raise
    return Run(
        config, workdir, data_info, process, spec, mesh, optimizer,
        make_learning_rate(config.optim, num_steps), abstract_state, state_sharding, checkpointer, rules,
    )


def _check_checkpoint_space(checkpointer: Checkpointer, abstract_state, keep: int) -> None:
    """Room for the checkpoints still to be written (keep + 1 exist while the newest is saved)."""
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) + 2**20  # + orbax metadata
    count = max(1, keep + 1 - len(checkpointer.steps()))
    check_free_space(checkpointer.directory, count * size, f"{count} checkpoint(s) of {size / 2**20:.1f} MiB")


def _check_batch_divisibility(config, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for key in ("train.batch_size", "eval.batch_size"):
        value = int(_get(config, key))
        if value % shards or value % jax.process_count():
            raise ConfigError(
                f"config.{key} = {value} must be divisible by the data-parallel size "
                f"data x fsdp = {shards} and by the number of processes {jax.process_count()}"
            )


def _abstract_with_sharding(abstract, sharding):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)


def restore_or_init(run: Run) -> tuple[TrainState, dict | None]:
    """The newest restorable checkpoint (after a compatibility check) or a fresh sharded state."""
    if run.checkpointer.latest_step() is not None:
        target = _abstract_with_sharding(run.abstract_state, run.state_sharding)
        current = compatibility_fingerprint(run.config)
        restored = run.checkpointer.restore(
            target, check_metadata=lambda step, metadata: _check_compatible(run, step, metadata, current)
        )
        if restored.skipped:
            log.warning("skipped unreadable checkpoints at steps %s", restored.skipped)
        log.info("resumed from the checkpoint at step %d", restored.step)
        return restored.state, restored.data_state
    init = jax.jit(
        lambda: create_train_state(run.spec.init_params(), run.optimizer, run.config.seed),
        out_shardings=run.state_sharding,
    )
    return init(), None


def _check_compatible(run: Run, step: int, metadata: dict, current: dict) -> None:
    saved = metadata.get("compatibility", {})
    differences = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if differences:
        details = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differences.items())
        raise CheckpointError(
            f"the checkpoint at step {step} in {run.checkpointer.directory} was written by an "
            f"incompatible config ({details}); use another workdir or the matching config"
        )


def make_jitted_train_step(run: Run, loss_fn) -> Callable:
    transform = label_dropout_transform(float(run.config.train.label_dropout), run.spec.num_classes)
    step = make_train_step(
        loss_fn,
        run.optimizer,
        float(run.config.train.ema_decay),
        ema_warmup=bool(run.config.train.ema_warmup),
        batch_transform=transform,
        learning_rate=run.learning_rate,
    )
    return jax.jit(run.under_mesh(step), out_shardings=(run.state_sharding, None), donate_argnums=0)


def make_jitted_sampler(run: Run, num: int) -> Callable:
    """sampler(params, key) -> (num, H, W, C) numpy images on every process, sampled sharded over
    the data axes (the batch is padded up to a multiple of data x fsdp; the extra images are dropped)."""
    shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    padded = -(-num // shards) * shards
    sample_fn = make_sample_fn(run.config, run.spec, run.process, run.image_shape)
    jitted = jax.jit(
        run.under_mesh(lambda params, key: sample_fn(params, key, padded)),
        in_shardings=(run.state_sharding.params, shard_lib.replicated(run.mesh)),
        out_shardings=shard_lib.batch_sharding(run.mesh, 4),
    )
    return lambda params, key: gather_to_host(jitted(params, key))[:num]


def write_sample_grid(run: Run, sampler, params, step: int, name: str | None = None) -> str | None:
    images = sampler(params, jax.random.key(run.config.seed + 1))
    if not run.is_main_process:
        return None
    os.makedirs(os.path.join(run.workdir, "samples"), exist_ok=True)
    path = os.path.join(run.workdir, "samples", name or f"step_{step:07d}.png")
    upscale = max(1, 64 // max(run.image_shape[:2]))
    return save_image_grid(images, path, upscale=upscale)


# ------------------------------------------------------------------------------------------------
# stop requests (SIGTERM / SIGINT): finish the step, save, exit cleanly
# ------------------------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a second SIGINT interrupts)."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def reason(self) -> str:
        """What stopped the run (another process's signal, if this one received none)."""
        return f"signal {signal.Signals(self.signal or signal.SIGTERM).name}"

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self)
        except ValueError:  # not in the main thread: no handlers
            previous = {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def any_process_stopping(flag: bool) -> bool:
    """True on every process if any process received a stop signal (all stop at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def train(config, workdir: str, devices=None) -> dict:
    """Train from `config` in `workdir` (resuming from its newest checkpoint); returns a summary.

    SIGTERM/SIGINT at any time (set-up and compilation included) finish the current step, save
    and return with summary["stopped_by"]."""
    stop = StopRequest()
    with stop.installed():
        return _train(config, workdir, devices, stop)


def _train(config, workdir: str, devices, stop: StopRequest) -> dict:
    run = prepare_run(config, workdir, devices, training=True)
    cfg = run.config
    loss_fn = build_loss(cfg, run.spec, run.process)
    state, data_state = restore_or_init(run)
    start_step = int(jax.device_get(state.step))
    num_steps = int(cfg.train.num_steps)
    inject_nonfinite_at = frozenset(cfg.train.inject_nonfinite_at)

    iterator = data_lib.make_iterator(
        cfg.data,
        split="train",
        global_batch_size=int(cfg.train.batch_size),
        seed=int(cfg.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if data_state is not None:
        iterator.set_state(data_state)

    train_step = make_jitted_train_step(run, loss_fn)
    sampler = make_jitted_sampler(run, int(cfg.sample.num_samples))
    writer = MetricWriter(run.workdir, enabled=run.is_main_process)
    log.info(
        "model %s: %.2fM parameters; mesh %s; data %s %s; %d -> %d steps",
        cfg.model.name, run.spec.num_params / 1e6, dict(run.mesh.shape), cfg.data.source,
        run.image_shape, start_step, num_steps,
    )
    progress = tqdm.tqdm(
        total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
        disable=not (run.is_main_process and cfg.train.progress_bar), file=sys.stdout,
    )
    step, last_metrics, stop_reason, saved_step = start_step, {}, None, start_step
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < num_steps:
            if any_process_stopping(stop.signal is not None):
                stop_reason = stop.reason
                break
            batch = next(iterator)
            if step + 1 in inject_nonfinite_at:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            state, metrics = train_step(state, shard_lib.global_batch(batch, run.mesh))
            step += 1
            window_steps += 1
            progress.update(1)
            nonfinite_run = int(jax.device_get(state.consecutive_nonfinite))
            if nonfinite_run:
                _check_nonfinite(cfg, step, nonfinite_run, int(jax.device_get(state.skipped_steps)))
            if step % cfg.train.log_every == 0 or step == num_steps:
                elapsed = time.perf_counter() - window_start
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last_metrics["steps_per_second"] = window_steps / max(elapsed, 1e-9)
                last_metrics["skipped_steps"] = int(jax.device_get(state.skipped_steps))
                writer.write(step, last_metrics)
                progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", refresh=False)
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.train.checkpoint_every == 0:
                run.checkpointer.save(step, state, iterator.get_state(), run.metadata())
                saved_step = step
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < num_steps:
                write_sample_grid(run, sampler, state.ema_params, step)
    except BaseException:
        _final_save(run, step, saved_step, state, iterator, quiet=True)
        raise
    finally:
        progress.close()
        writer.close()
    _final_save(run, step, saved_step, state, iterator)
    if stop_reason is None and any_process_stopping(stop.signal is not None):  # came in the last step
        stop_reason = stop.reason  # exit promptly: no final samples

    summary = {"step": step, "num_params": run.spec.num_params, **last_metrics}
    if stop_reason is not None:
        log.info("stopped by %s at step %d; checkpoint saved in %s", stop_reason, step, run.checkpointer.directory)
        summary["stopped_by"] = stop_reason
        return summary
    grid = write_sample_grid(run, sampler, state.ema_params, step)
    summary["samples"] = grid
    summary["checkpoint"] = os.path.join(run.checkpointer.directory, str(step))
    if run.is_main_process:
        _write_json(os.path.join(run.workdir, "summary.json"), summary)
    return summary


def _final_save(run: Run, step: int, saved_step: int, state, iterator, quiet: bool = False) -> None:
    """Save the state reached (unless already saved) and wait for the write to be committed.
    quiet: log a failure instead of raising it (never mask the error that ended training)."""
    try:
        if step != saved_step:
            run.checkpointer.save(step, state, iterator.get_state(), run.metadata())
        run.checkpointer.close()
    except Exception:
        if not quiet:
            raise
        log.exception("saving the final checkpoint at step %d failed", step)


def _check_nonfinite(config, step: int, consecutive: int, skipped: int) -> None:
    policy = config.train.nonfinite_policy
    limit = 1 if policy == "stop" else int(config.train.max_consecutive_nonfinite)
    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, %d in total)",
                step, consecutive, skipped)
    if consecutive >= limit:
        raise TrainingStopped(
            f"stopping at step {step}: {consecutive} consecutive steps with non-finite loss or gradients "
            f"(policy {policy!r}, limit {limit}); parameters stay at the last finite update and the last "
            "checkpoint holds finite parameters. Lower optim.learning_rate, set optim.grad_clip, or check "
            "the data for NaN/inf."
        )


def _write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# sample and evaluate from the newest checkpoint
# ------------------------------------------------------------------------------------------------


def gather_to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) sharded array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def restore_for_inference(config, workdir: str, devices=None) -> tuple[Run, TrainState]:
    run = prepare_run(config, workdir, devices)
    if run.checkpointer.latest_step() is None:
        raise CheckpointError(f"no checkpoint in {run.checkpointer.directory}; train first (--mode train)")
    state, _ = restore_or_init(run)
    return run, state


def sample_from_checkpoint(config, workdir: str, devices=None) -> dict:
    """Sample config.sample.num_samples images with the EMA parameters; writes a PNG grid and an
    .npz of uint8 images to workdir/samples."""
    run, state = restore_for_inference(config, workdir, devices)
    step = int(jax.device_get(state.step))
    sampler = make_jitted_sampler(run, int(config.sample.num_samples))
    start = time.perf_counter()
    images = sampler(state.ema_params, jax.random.key(config.seed + 2))
    seconds = time.perf_counter() - start
    summary = {"step": step, "num_samples": int(images.shape[0]), "seconds": seconds}
    if run.is_main_process:
        out = os.path.join(run.workdir, "samples")
        os.makedirs(out, exist_ok=True)
        summary["grid"] = save_image_grid(images, os.path.join(out, f"sample_step_{step:07d}.png"),
                                          upscale=max(1, 64 // max(run.image_shape[:2])))
        npz = os.path.join(out, f"sample_step_{step:07d}.npz")
        with open(npz + ".tmp", "wb") as f:
            np.savez(f, images=to_uint8(images))
        os.replace(npz + ".tmp", npz)
        summary["npz"] = npz
    run.checkpointer.close()
    return summary


def evaluation_split(run: Run) -> str:
    """"test" when the data set has one, else "train" (e.g. scikit-learn's 8x8 digits)."""
    return "test" if "test" in run.data_info.num_examples else "train"


def test_loss(run: Run, params, batches: int) -> float:
    """Mean denoising loss of `params` on the evaluation split (fixed keys: comparable across runs)."""
    loss_fn = build_loss(run.config, run.spec, run.process)
    iterator = data_lib.make_iterator(
        run.config.data, split=evaluation_split(run), global_batch_size=int(run.config.eval.batch_size),
        seed=int(run.config.seed), process_index=jax.process_index(),
        process_count=jax.process_count(), shuffle=False, num_epochs=1,
    )
    evaluate_batch = jax.jit(run.under_mesh(lambda p, key, batch: loss_fn(p, key, batch)[0]))
    values = []
    for i, batch in enumerate(iterator):
        if i >= batches:
            break
        values.append(float(evaluate_batch(params, jax.random.key(i), shard_lib.global_batch(batch, run.mesh))))
    if not values:
        raise ConfigError(
            f"the {evaluation_split(run)!r} split yielded no batch of {run.config.eval.batch_size}; "
            "lower config.eval.batch_size"
        )
    return float(np.mean(values))


def evaluate(config, workdir: str, devices=None) -> dict:
    """Evaluate the newest checkpoint's EMA parameters: the test-split denoising loss; FID and KID of
    config.eval.num_samples samples (configured sampler) against as many images of the evaluation
    split, unless config.eval.fid is False; bits/dim of config.eval.bits_per_dim_examples images."""
    from diffjax.training import eval_metrics as eval_lib

    run, state = restore_for_inference(config, workdir, devices)
    params, split = state.ema_params, evaluation_split(run)
    summary = {
        "step": int(jax.device_get(state.step)),
        "split": split,
        "test_loss": test_loss(run, params, int(config.eval.loss_batches)),
        "sampler": {k: config.sample[k] for k in ("solver", "steps", "grid", "guidance_scale")},
    }
    batch = int(config.eval.batch_size)
    if config.eval.fid:
        from diffjax import evaluation

        num = int(config.eval.num_samples)
        inception = evaluation.load_inception_params(config.eval.inception_weights or None)
        reference = eval_lib.reference_for_split(run, split, num, inception)
        samples = eval_lib.sample_images(run, params, num, jax.random.key(config.seed + 3), batch_size=batch)
        summary.update(eval_lib.sample_quality(samples, reference, inception, batch_size=batch))
    if config.eval.bits_per_dim_examples:
        images, labels = eval_lib.split_images(run, split, int(config.eval.bits_per_dim_examples))
        summary["bits_per_dim"] = eval_lib.bits_per_dim(
            run, params, images, labels, jax.random.key(config.seed + 4), batch_size=batch)
    if run.is_main_process:
        _write_json(os.path.join(run.workdir, f"eval_step_{summary['step']:07d}.json"), summary)
    run.checkpointer.close()
    return summary
