"""Load a trained run in Python: `load_run(workdir)` reads the config stored with the checkpoint,
rebuilds the model, process and denoiser, and restores the parameters; no training data needed.
`save_run_weights(workdir, path)` writes a run's EMA parameters and stored config to one file (about
a quarter of a checkpoint: no raw parameters, no optimizer state) that `load_run(path)` reads back.

    run = load_run("work/default")
    images = run.sample(jax.random.key(0), 16)        # the run's configured sampler, EMA params
                                                      # (a latent run: decoded by its autoencoder)
    save_image_grid(images, "grid.png")
    x0 = run.denoiser.x0(x_t, t)                      # or any diffjax sampler / likelihood
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import serialization

from diffjax import data as data_lib
from diffjax.denoisers import Denoiser
from diffjax.io import atomic_write_bytes
from diffjax.processes import GaussianProcess
from diffjax.training import sharding as shard_lib
from diffjax.training.build import declaring, network
from diffjax.training.checkpoint import Checkpointer, CheckpointError, Restored
from diffjax.training.config import upgrade_config_dict
from diffjax.training.from_config import prediction_from_config
from diffjax.training.latents import with_latent_decoder
from diffjax.training.run import Run, build_run, checkpoint_steps, make_jitted_sampler, sharded_target
from diffjax.training.state import leaf_names

__all__ = ["LoadedRun", "load_run", "save_run_weights", "restore_run", "read_run_metadata", "config_from_metadata"]

log = logging.getLogger("diffjax")

WEIGHTS_FORMAT = "diffjax-run-weights/1"  # the "format" entry of a save_run_weights file
CHECKPOINT_ONLY_METADATA = ("checksums", "data_checksum")  # of the whole train state: not the file's


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained run: its config (as stored in the checkpoint), parameters and pieces.

    apply(params, x, t, y=None) is the raw network; `denoiser` is the ready Denoiser of the EMA
    parameters (preconditioning included; class-conditional models: see `denoiser_for`)."""

    config: ml_collections.ConfigDict
    step: int
    params: Any
    ema_params: Any
    apply: Callable
    process: GaussianProcess
    image_shape: tuple[int, int, int]
    num_classes: int  # 0: unconditional
    run: Run
    workdir: str

    def denoiser_for(self, params=None, labels=None) -> Denoiser:
        """The Denoiser of `params` (default: the EMA parameters) given class `labels` (an int
        array of the batch size; None for unconditional models, num_classes = the null class)."""
        params = self.ema_params if params is None else params
        return self.run.to_denoiser(network(self.apply, params, labels))

    @property
    def denoiser(self) -> Denoiser:
        """The Denoiser of the EMA parameters (unconditional; conditional models: `denoiser_for`)."""
        return self.denoiser_for()

    def sample(self, key: jax.Array, num: int, params=None, *, decode: bool = True) -> np.ndarray:
        """`num` samples (num, H, W, C) in [-1, 1] from the run's configured sampler (stored config,
        sample section: solver, steps, grid, guidance), sharded over the run's mesh. A latent run
        with an autoencoder returns them decoded to images (decode=False: the latents)."""
        params = self.ema_params if params is None else params
        samples = make_jitted_sampler(self.run, int(num))(params, key)
        return self.run.decode(samples) if decode and self.run.decode is not None else samples


def _tuples(value):
    """JSON lists back to tuples (configs hold tuples: channel_mult, attn_resolutions, ...)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_metadata(metadata: dict) -> ml_collections.ConfigDict:
    """The config stored with a checkpoint, in today's keys and names (an older run's renamed
    losses, solvers and grids and its flat loss keys are translated, each change logged)."""
    if "config" not in metadata:
        raise CheckpointError("the checkpoint holds no config (written by a diffjax version before 0.1?)")
    config, changes = upgrade_config_dict(_tuples(metadata["config"]))
    for change in changes:
        log.info("stored config upgraded: %s", change)
    return ml_collections.ConfigDict(config)


def _checkpoint_directory(workdir: str) -> tuple[str, list[int]]:
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}; train first (--mode train)")
    return directory, steps


def read_run_metadata(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, metadata) of the checkpoint at `step` (default: the newest) of the run in workdir."""
    directory, steps = _checkpoint_directory(workdir)
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {directory}; there are steps {steps}")
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        return step, dict(checkpointer.read_metadata(step))
    finally:
        checkpointer.close()


def _data_info(config, metadata: dict) -> data_lib.DataInfo:
    """The data's shape and classes as stored with the checkpoint (older checkpoints: from the data)."""
    stored = metadata.get("data")
    if stored is None:
        return data_lib.dataset_info(config.data)
    shape = tuple(int(x) for x in stored["image_shape"])
    return data_lib.DataInfo(shape, shape, {}, int(stored["num_classes"]))


def _run_of_metadata(metadata: dict, mesh: jax.sharding.Mesh | None) -> Run:
    """The Run of a checkpoint's stored config and data shape on `mesh` (default: every device on a
    data-only mesh, parameters replicated)."""
    config = config_from_metadata(metadata)
    if mesh is None:
        mesh = shard_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    return build_run(config, _data_info(config, metadata), mesh)


def restore_run(
    workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None
) -> tuple[Run, Restored]:
    """(the Run of the stored config, the whole restored checkpoint: train state, data-iterator
    state, metadata) of the run in workdir at `step` (default: the newest restorable one).
    mesh: default every device on a data-only mesh (parameters replicated)."""
    directory, _ = _checkpoint_directory(workdir)
    step_read, metadata = read_run_metadata(workdir, step)
    run = _run_of_metadata(metadata, mesh)
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        restored = checkpointer.restore(sharded_target(run), step=step)
    finally:
        checkpointer.close()
    if restored.step != step_read:
        log.warning("the checkpoint at step %d could not be restored; loaded step %d", step_read, restored.step)
    return run, restored


def _with_stored_latent_decoder(run: Run, config) -> Run:
    """with_latent_decoder, or `run` unchanged with a warning when the stored cache or autoencoder
    is gone (the parameters load without them)."""
    try:
        return with_latent_decoder(run, config)
    except (OSError, ValueError) as error:
        log.warning("samples stay latents: the stored autoencoder cannot decode them (%s)", error)
        return run


def load_run(
    workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None, latent_decoder: bool = True
) -> LoadedRun:
    """The trained run in `workdir` at `step` (default: the newest restorable checkpoint): the
    config stored with it, raw and EMA parameters, apply, process, denoiser. Needs no training data.

    workdir may also be a file written by `save_run_weights` (step: None or the file's): it holds
    only the EMA parameters, so `params` are those too, and `workdir` is then the file's folder.
    mesh: where the parameters are placed (default: every device on a data-only mesh, i.e.
    replicated). latent_decoder: a latent run (data.source = "latents") gets the autoencoder of its
    stored data config as run.decode (training/latents.py) when the cache and autoencoder can be
    found; otherwise a warning, and samples stay latents. Raises CheckpointError when there is no
    checkpoint (nothing is created)."""
    if os.path.isfile(os.path.expanduser(workdir)):
        path = os.path.expanduser(workdir)
        run, saved_step, metadata, ema_params = _restore_weights_file(path, mesh)
        if step is not None and step != saved_step:
            raise ValueError(f"{workdir!r} is a weights file of step {saved_step}; load it with step=None, not {step}")
        step, params, directory = saved_step, ema_params, os.path.dirname(os.path.abspath(path))
    else:
        run, restored = restore_run(workdir, step, mesh=mesh)
        step, metadata = restored.step, restored.metadata
        params, ema_params = restored.state.params, restored.state.ema_params
        directory = os.path.dirname(_checkpoint_directory(workdir)[0])
    config = config_from_metadata(metadata)
    if latent_decoder:
        run = _with_stored_latent_decoder(run, config)
    return LoadedRun(
        config=config,
        step=int(step),
        params=params,
        ema_params=ema_params,
        apply=declaring(run.spec.apply, prediction_from_config(config)),
        process=run.process,
        image_shape=run.image_shape,
        num_classes=run.spec.num_classes,
        run=run,
        workdir=directory,
    )


def save_run_weights(workdir: str, path: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None) -> str:
    """Write the EMA parameters (train.ema_decay's average, as `load_run` samples with; not a post-hoc
    reconstruction) of the run in `workdir` at `step` (default: the newest restorable checkpoint) and
    the metadata stored with it (config, data shape) to the file `path` (flax msgpack, written
    atomically), for `load_run(path)`; returns the path. One host; mesh: where the checkpoint is
    restored (default: replicated on every device). A latent run's file decodes where its latent
    cache (config.data.path) can be found."""
    target = os.path.expanduser(path)
    if os.path.isdir(target) or not os.path.isdir(os.path.dirname(os.path.abspath(target))):
        raise ValueError(f"save_run_weights writes one file into an existing folder; got {path!r}")
    _, restored = restore_run(workdir, step, mesh=mesh)
    metadata = {k: v for k, v in restored.metadata.items() if k not in CHECKPOINT_ONLY_METADATA}
    payload = {
        "format": WEIGHTS_FORMAT,
        "step": int(restored.step),
        "metadata": json.dumps(metadata),
        # string keys, as the models' parameter dicts have (to_state_dict would turn int keys into str)
        "ema_params": serialization.to_state_dict(jax.device_get(restored.state.ema_params)),
    }
    return atomic_write_bytes(target, serialization.msgpack_serialize(payload))


def _restore_weights_file(path: str, mesh: jax.sharding.Mesh | None) -> tuple[Run, int, dict, Any]:
    """(run, step, metadata, EMA parameters placed as the run's) of a save_run_weights file."""
    data = Path(path).read_bytes()
    try:
        payload = serialization.msgpack_restore(data)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path!r} is not a weights file of save_run_weights ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"{path!r} is not a weights file of save_run_weights: format {found!r}, this version reads "
            f"{WEIGHTS_FORMAT!r}"
        )
    missing = [k for k in ("step", "metadata", "ema_params") if k not in payload]
    if missing:
        raise CheckpointError(f"{path!r} is a truncated weights file: it lacks {missing}")
    metadata = json.loads(payload["metadata"])
    run = _run_of_metadata(metadata, mesh)
    target = sharded_target(run).ema_params
    names, built = leaf_names(payload["ema_params"]), leaf_names(target)
    if names != built:
        raise CheckpointError(
            f"{path!r} does not hold the parameters its stored config builds: missing "
            f"{sorted(set(built) - set(names))[:5]}, unexpected {sorted(set(names) - set(built))[:5]}"
        )
    stored = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(payload["ema_params"]))
    for name, want, have in zip(built, jax.tree.leaves(target), jax.tree.leaves(stored)):
        if tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
            raise CheckpointError(
                f"{path!r}: parameter {name} is {have.dtype}{list(have.shape)}, its config builds "
                f"{want.dtype}{list(want.shape)}"
            )
    placed = jax.tree.map(lambda value, want: jax.device_put(value, want.sharding), stored, target)
    return run, int(payload["step"]), metadata, placed
