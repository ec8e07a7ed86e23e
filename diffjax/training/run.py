"""A run built from a config, as plain values: `build_run(config, data_info, mesh)` is pure (no
file is read or written, nothing is compiled); the environment checks (work directory, free
space) are separate, and so is everything that touches a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

import diffjax
from diffjax.processes import GaussianProcess
from diffjax.training import from_config as fc
from diffjax.training import sharding as shard_lib
from diffjax.training.build import ModelSpec, build_model_spec, label_dropout_transform, make_sample_fn
from diffjax.training.checkpoint import Checkpointer, CheckpointError
from diffjax.training.config import ConfigError, validate_config
from diffjax.training.discrete_run import discrete_pieces, is_discrete
from diffjax.training.state import ParamAverage, TrainState, create_train_state, make_train_step, stream_key

__all__ = [
    "Run",
    "default_compilation_cache_dir",
    "enable_compilation_cache",
    "build_run",
    "check_environment",
    "check_batch_sizes",
    "config_differences",
    "config_compatibility",
    "restore_or_init",
    "make_jitted_train_step",
    "make_jitted_sampler",
    "gather_to_host",
]

# Compiled programs that took less than this are not written to the persistent cache (JAX's default
# is 1 s; the small programs of a CPU run, e.g. sampling, take ~0.5-1 s and are worth keeping).
CACHE_MIN_COMPILE_TIME_S = 0.3

# Config values a checkpoint must agree with to be resumed or loaded by another config.
COMPATIBILITY_KEYS = ("process", "model", "loss.prediction", "loss.sigma_data", "data.image_size", "data.channels")
DISCRETE_COMPATIBILITY_KEYS = tuple(
    f"discrete.{key}"
    for key in ("process", "process_options", "tokens", "vocab_size", "sequence_length", "time_free", "model_options")
)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run needs, built from a config, before any state exists (plain values)."""

    process: GaussianProcess
    spec: ModelSpec
    image_shape: tuple[int, int, int]
    loss_fn: Callable  # loss_fn(params, key, batch) -> (loss, aux)
    to_denoiser: Callable  # to_denoiser(net) -> Denoiser of a trained network net(x, t)
    sampler: Callable  # sampler(denoiser, key, shape) -> samples
    guidance_scale: float
    label_dropout: float
    mesh: jax.sharding.Mesh
    rules: dict
    learning_rate: optax.Schedule
    optimizer: optax.GradientTransformation
    average: ParamAverage
    tracked: tuple  # ParamAverage of each post-hoc EMA profile (state.tracked_averages)
    seed: int
    abstract_state: TrainState
    state_sharding: TrainState
    metadata: dict  # stored with every checkpoint: config, compatibility, schedule, data shape
    save_samples: Callable | None = None  # save_samples(samples, path stem) -> path; None: a PNG grid
    decode: Callable | None = None  # decode(samples) -> images in [-1, 1] (latent runs, see training/latents.py)

    def under_mesh(self, fn: Callable) -> Callable:
        """fn traced under this run's mesh and logical axis rules."""
        return shard_lib.traced_under_mesh(fn, self.mesh, self.rules)

    @property
    def sample_fn(self) -> Callable:
        """sample_fn(params, key, num) -> (num, H, W, C) samples (traceable, num static)."""
        return make_sample_fn(self.sampler, self.to_denoiser, self.spec, self.image_shape, self.guidance_scale)

    def key(self, stream: str) -> jax.Array:
        """The root key of a named random stream of this run's seed (see state.stream_key)."""
        return stream_key(self.seed, stream)

    def with_sampler(self, sampler: Callable, guidance_scale: float | None = None) -> "Run":
        """A copy of this run that samples with `sampler` (and `guidance_scale`)."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return dataclasses.replace(self, sampler=sampler, guidance_scale=scale)

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0


def default_compilation_cache_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/diffjax/jax-compilation-cache
    (~/.cache/... without XDG_CACHE_HOME): one cache for every run of the user."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffjax", "jax-compilation-cache")


def enable_compilation_cache(directory: str | None = None, min_compile_time_s: float = CACHE_MIN_COMPILE_TIME_S) -> str:
    """Turn on JAX's persistent compilation cache in `directory` (default
    `default_compilation_cache_dir()`): a program compiled once (train step, sampler, evaluation) is
    read back by later processes with the same program, jax version and device instead of being
    compiled again. Call before the first compilation; returns the absolute directory."""
    directory = os.path.abspath(os.path.expanduser(directory or default_compilation_cache_dir()))
    if not isinstance(min_compile_time_s, (int, float)) or not min_compile_time_s >= 0:
        raise ValueError(f"min_compile_time_s={min_compile_time_s!r}: must be a number >= 0")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return directory


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value.to_dict() if hasattr(value, "to_dict") else value


def _as_json(value):
    return json.loads(json.dumps(value, default=str))  # tuples become lists, as read back


def config_compatibility(config) -> dict:
    """The config's values of COMPATIBILITY_KEYS (and of DISCRETE_COMPATIBILITY_KEYS in a discrete
    run, train.posthoc_ema when set: the train state holds one average per profile), as stored in a
    checkpoint's metadata."""
    keys = COMPATIBILITY_KEYS + (DISCRETE_COMPATIBILITY_KEYS if is_discrete(config) else ())
    keys += ("train.posthoc_ema",) if len(config.train.posthoc_ema) else ()
    return _as_json({key: _get(config, key) for key in keys})


def run_metadata(config, spec: ModelSpec, image_shape, num_classes: int) -> dict:
    return {
        "diffjax_version": diffjax.__version__,
        "config": json.loads(config.to_json_best_effort()),
        "compatibility": config_compatibility(config),
        "schedule": _as_json(fc.schedule_fields(config)),
        "data": {"image_shape": [int(x) for x in image_shape], "num_classes": int(num_classes)},
        "num_params": spec.num_params,
    }


def build_run(config, data_info, mesh: jax.sharding.Mesh) -> Run:
    """Validate `config` and build every piece of its run for data described by `data_info`
    (image_shape, num_classes) on `mesh`. Pure: raises ConfigError before anything is compiled."""
    validate_config(config)
    image_shape = tuple(int(x) for x in data_info.image_shape)
    num_classes = int(data_info.num_classes or 0)
    seed = int(config.seed)
    pieces = discrete_pieces if is_discrete(config) else _gaussian_pieces
    process, spec, loss_fn, to_denoiser, sampler, save_samples = pieces(config, image_shape, num_classes, seed, mesh)
    label_dropout = float(config.train.label_dropout)
    if label_dropout > 0 and not spec.conditional:
        raise ConfigError(
            f"config.train.label_dropout = {label_dropout} needs a class-conditional model "
            "(model.class_conditional=True on labelled data); use 0.0 for this unconditional model"
        )
    rules = fc.rules_from_config(config)
    guidance_scale = float(config.sample.guidance_scale)
    if guidance_scale != 1.0 and not spec.conditional:
        raise ConfigError(
            f"config.sample.guidance_scale = {config.sample.guidance_scale} needs a class-conditional "
            "model trained with label dropout (model.class_conditional=True, train.label_dropout > 0); "
            "use 1.0 for this unconditional model"
        )
    sample_fn = make_sample_fn(sampler, to_denoiser, spec, image_shape, guidance_scale)
    try:  # validate config.sample by tracing sample() once with abstract inputs (no compilation)
        jax.eval_shape(lambda p, k: sample_fn(p, k, 2), spec.abstract_params, jax.random.key(0))
    except ValueError as err:
        raise ConfigError(f"config.sample: {err}") from err

    learning_rate = fc.learning_rate_from_config(config)
    optimizer = fc.optimizer_from_config(config, learning_rate)
    average = fc.average_from_config(config)
    tracked = fc.tracked_averages_from_config(config)
    abstract_state = jax.eval_shape(
        lambda: create_train_state(
            spec.init_params(), optimizer, stream_key(seed, "train"), average=average, tracked=tracked
        )
    )
    params_sharding = shard_lib.param_shardings(spec.abstract_params, spec.logical_specs, mesh, rules)
    state_sharding = shard_lib.state_shardings(abstract_state, params_sharding, optimizer, mesh)
    return Run(
        process=process,
        spec=spec,
        image_shape=image_shape,
        loss_fn=loss_fn,
        to_denoiser=to_denoiser,
        sampler=sampler,
        guidance_scale=guidance_scale,
        label_dropout=label_dropout,
        mesh=mesh,
        rules=rules,
        learning_rate=learning_rate,
        optimizer=optimizer,
        average=average,
        tracked=tracked,
        seed=seed,
        abstract_state=abstract_state,
        state_sharding=state_sharding,
        metadata=run_metadata(config, spec, image_shape, num_classes),
        save_samples=save_samples,
    )


def _training_network(apply, mesh: jax.sharding.Mesh):
    """The network the loss calls: on a CPU split into several data-parallel devices, one whose
    parameter gradient is one all-reduce of one buffer (shard_lib.network_with_one_gradient_all_reduce:
    XLA's CPU runtime pays per all-reduce operand); elsewhere `apply` itself."""
    if jax.default_backend() == "cpu" and mesh.shape["data"] > 1 and shard_lib.replicates_params(mesh):
        return shard_lib.network_with_one_gradient_all_reduce(apply, mesh)
    return apply


def _gaussian_pieces(config, image_shape, num_classes: int, seed: int, mesh: jax.sharding.Mesh) -> tuple:
    """(process, model spec, loss_fn, to_denoiser, sampler, save_samples = None: a PNG grid) of a Gaussian run."""
    process = fc.process_from_config(config)
    spec = build_model_spec(fc.model_config_from_config(config, image_shape, num_classes, process), seed)
    loss_fn = fc.loss_from_config(
        config, _training_network(spec.apply, mesh), process, conditional=spec.conditional, dropout=spec.dropout
    )
    to_denoiser, sampler = fc.denoiser_factory_from_config(config, process), fc.sampler_from_config(config)
    return process, spec, loss_fn, to_denoiser, sampler, None


# ------------------------------------------------------------------------------------------------
# environment checks (read-only: nothing is created)
# ------------------------------------------------------------------------------------------------


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable_directory(path: str) -> str:
    """Raise ConfigError unless `path` is, or can be created as, a writable directory; creates
    nothing. Returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    existing = _existing_ancestor(path)
    if not os.path.isdir(existing):
        reason = "a file is in the way" if existing == path else f"{existing!r} is a file"
        raise ConfigError(f"work directory {path!r} is not writable: {reason}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"work directory {path!r} is not writable: no write permission on {existing!r}")
    return path


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the committed checkpoints in `directory` (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def check_disk_space(path: str, needed_bytes: int, what: str) -> None:
    """Raise ConfigError when the file system holding `path` has less than `needed_bytes` free."""
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed_bytes:
        raise ConfigError(
            f"{path!r} has {free / 2**20:.1f} MiB free, but {what} need about {needed_bytes / 2**20:.1f} MiB; "
            "free some disk space or use another work directory"
        )


def check_environment(workdir: str, abstract_state, keep_checkpoints: int) -> str:
    """The work directory and its checkpoints/ can be written, with room for the checkpoints still
    to be written (keep + 1 exist while the newest is saved). Creates nothing; returns the
    absolute work directory."""
    workdir = check_writable_directory(workdir)
    directory = check_writable_directory(os.path.join(workdir, "checkpoints"))
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) + 2**20  # + orbax metadata
    count = max(1, keep_checkpoints + 1 - len(checkpoint_steps(directory)))
    check_disk_space(directory, count * size, f"{count} checkpoint(s) of {size / 2**20:.1f} MiB")
    return workdir


def check_batch_sizes(mesh: jax.sharding.Mesh, sizes: dict[str, int]) -> None:
    """Each global batch size splits evenly over the data-parallel shards and the processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for key, value in sizes.items():
        if value % shards or value % jax.process_count():
            raise ConfigError(
                f"config.{key} = {value} must be divisible by the data-parallel size "
                f"data x fsdp = {shards} and by the number of processes {jax.process_count()}"
            )


# ------------------------------------------------------------------------------------------------
# checkpoints: compatibility, restore or init
# ------------------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every leaf that differs between two nested dicts."""
    old, new = _flatten(saved), _flatten(current)
    missing = "<absent>"
    return [
        f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    ]


def check_compatible(directory: str, step: int, saved_metadata: dict, metadata: dict, *, schedule: bool = True) -> None:
    """Refuse a checkpoint written by an incompatible config (or, if `schedule`, with another
    learning-rate schedule), naming the differing fields only."""
    differences = config_differences(saved_metadata.get("compatibility", {}), metadata["compatibility"])
    if differences:
        raise CheckpointError(
            f"the checkpoint at step {step} in {directory} was written by an incompatible config "
            f"(checkpoint -> config): {'; '.join(differences)}. Use another workdir or the matching config."
        )
    if schedule and "schedule" in saved_metadata:
        differences = config_differences(saved_metadata["schedule"], metadata["schedule"])
        if differences:
            raise CheckpointError(
                f"resuming the checkpoint at step {step} in {directory} would change the learning-rate "
                f"schedule (checkpoint -> config): {'; '.join(differences)}. Resume with the checkpoint's "
                "values, or start a new run in another workdir."
            )


def _abstract_with_sharding(abstract, sharding):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)


def sharded_target(run: Run):
    """The run's abstract train state with its shardings: what a checkpoint is restored onto."""
    return _abstract_with_sharding(run.abstract_state, run.state_sharding)


def init_state(run: Run) -> TrainState:
    """A fresh train state, created directly with its shardings."""
    init = jax.jit(
        lambda: create_train_state(
            run.spec.init_params(), run.optimizer, run.key("train"), average=run.average, tracked=run.tracked
        ),
        out_shardings=run.state_sharding,
    )
    return init()


def restore_or_init(run: Run, checkpointer: Checkpointer):
    """(state, data-iterator state, restored) from the newest restorable checkpoint after the
    compatibility and schedule checks, or (fresh state, None, None)."""
    if checkpointer.latest_step() is None:
        return init_state(run), None, None
    restored = checkpointer.restore(
        sharded_target(run),
        check_metadata=lambda step, saved: check_compatible(checkpointer.directory, step, saved, run.metadata),
    )
    return restored.state, restored.data_state, restored


# ------------------------------------------------------------------------------------------------
# jitted train step and sampler
# ------------------------------------------------------------------------------------------------


def make_jitted_train_step(run: Run) -> Callable:
    step = make_train_step(
        run.loss_fn,
        run.optimizer,
        run.average,
        batch_transform=label_dropout_transform(run.label_dropout, run.spec.num_classes),
        learning_rate=run.learning_rate,
        tracked=run.tracked,
    )
    return jax.jit(run.under_mesh(step), out_shardings=(run.state_sharding, None), donate_argnums=0)


def gather_to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) sharded array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_jitted_sampler(run: Run, num: int) -> Callable:
    """sampler(params, key) -> (num, H, W, C) numpy images on every process, sampled sharded over
    the data axes (the batch is padded up to a multiple of data x fsdp; the extra images are dropped)."""
    shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    padded = -(-num // shards) * shards
    sample_fn = run.sample_fn
    jitted = jax.jit(
        run.under_mesh(lambda params, key: sample_fn(params, key, padded)),
        in_shardings=(run.state_sharding.params, shard_lib.replicated(run.mesh)),
        out_shardings=shard_lib.batch_sharding(run.mesh, 1 + len(run.image_shape)),
    )
    return lambda params, key: gather_to_host(jitted(params, key))[:num]
