"""`--mode sample` with a measurement operator (config.inverse): images of the evaluation split are
measured, y = A x + noise_std n, and reconstructed by a posterior sampler under the trained run's
prior; a grid of truth / A^+ y / reconstruction, the arrays, PSNR and measurement residual are
written to workdir/samples.

The Python API is `diffjax.control` on a loaded run:

    run = load_run(workdir)
    obs = measure(super_resolution(run.image_shape, 4), key, images, noise_std=0.0)
    x = posterior_sample(run.denoiser, obs, key, PiGDM(data_std=0.5), steps=50).samples
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import data as data_lib
from diffjax.control.operators import Observation, measure
from diffjax.control.posterior import posterior_sample
from diffjax.evaluation import psnr
from diffjax.io import atomic_write
from diffjax.training import eval_metrics as eval_lib
from diffjax.training import sharding as shard_lib
from diffjax.training.config import ConfigError
from diffjax.training.from_config import inverse_problem_from_config, solver_and_grid_from_config
from diffjax.training.images import save_image_grid, to_uint8
from diffjax.training.loop import evaluation_split, load_for_config

__all__ = ["reconstruct_from_checkpoint"]


def reconstruct_from_checkpoint(config, workdir: str, devices=None) -> dict:
    """Reconstruct config.inverse.num_images images of the evaluation split from their measurements
    with the EMA parameters of the newest checkpoint, on the run's mesh. Class-conditional runs use
    the null class (the unconditional prior that label dropout trains; sample.guidance_scale does not
    apply). Solver methods (DPS, DDRM, ...) run their own steps; guidance methods (PiGDM, DDNM) run
    config.sample.solver ('' = DDIM with eta = 1); both use sample.steps and sample.grid.
    Returns the mean PSNR (dB, images in [-1, 1]) of the reconstructions and of A^+ y, and the
    measurement residual: the RMS over images of |y - A x|, the norm over all measured entries."""
    if not config.inverse.operator:
        raise ConfigError("config.inverse.operator is '' (plain sampling); name an operator to reconstruct")
    loaded, run = load_for_config(config, workdir, devices)
    if loaded.num_classes and float(loaded.config.train.label_dropout) <= 0:
        raise ConfigError(
            "reconstruction needs an unconditional prior: this class-conditional run was trained with "
            "train.label_dropout = 0, so its null class is untrained"
        )
    operator, method, noise_std = inverse_problem_from_config(config, run.image_shape)
    solver, grid = solver_and_grid_from_config(config)
    _check_method_setting(operator, method, noise_std, solver, run.image_shape)
    num = int(config.inverse.num_images)
    images, _ = eval_lib.split_images(config.data, evaluation_split(data_lib.dataset_info(config.data)), num)
    if len(images) < num:
        raise ConfigError(f"config.inverse.num_images = {num}: the evaluation split has only {len(images)} images")
    truth = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    observation = measure(operator, run.key("inverse_noise"), truth, noise_std)
    labels = jnp.full((num,), loaded.num_classes, jnp.int32) if loaded.num_classes else None
    steps = int(config.sample.steps)

    def reconstruct(params, key):
        denoiser = loaded.denoiser_for(params, labels)
        return posterior_sample(denoiser, observation, key, method, solver=solver, steps=steps, grid=grid).samples

    replicated = shard_lib.replicated(run.mesh)
    jitted = jax.jit(
        run.under_mesh(reconstruct), in_shardings=(run.state_sharding.params, replicated), out_shardings=replicated
    )
    start = time.perf_counter()
    x = np.asarray(jitted(loaded.ema_params, run.key("inverse")))
    seconds = time.perf_counter() - start
    baseline = np.asarray(operator.pinv(observation.y))
    residual = np.asarray(observation.residual(jnp.asarray(x))).reshape(num, -1)
    summary = {
        "step": loaded.step,
        "operator": config.inverse.operator,
        "method": config.inverse.method,
        "noise_std": noise_std,
        "num_images": num,
        "psnr": float(np.mean(psnr(x, np.asarray(truth)))),
        "psnr_pseudo_inverse": float(np.mean(psnr(baseline, np.asarray(truth)))),
        "measurement_residual": float(np.sqrt(np.mean(np.sum(residual**2, axis=1)))),
        "seconds": seconds,
    }
    if run.is_main_process:
        name = f"inverse_{config.inverse.operator}_{config.inverse.method}_step_{loaded.step:07d}"
        out = os.path.join(loaded.workdir, "samples")
        os.makedirs(out, exist_ok=True)
        rows = np.concatenate([np.asarray(truth), np.clip(baseline, -1, 1), x])
        summary["grid"] = save_image_grid(
            rows, os.path.join(out, name + ".png"), columns=num, upscale=max(1, 64 // max(run.image_shape[:2]))
        )
        arrays = {"truth": images, "pseudo_inverse": to_uint8(baseline), "reconstruction": to_uint8(x)}
        arrays["measurement"] = np.asarray(observation.y)
        summary["npz"] = atomic_write(os.path.join(out, name + ".npz"), lambda f: np.savez(f, **arrays))
    return summary


def _check_method_setting(operator, method, noise_std: float, solver, image_shape) -> None:
    """ConfigError, before anything is compiled, when the method refuses the measurement (e.g. DDNM
    with noise) or config.sample.solver (solver methods run their own steps)."""
    dummy = Observation(operator, jnp.zeros((1,) + tuple(operator.out_shape)), noise_std)
    try:
        method.check_observation(dummy)
        if not method.is_guidance:
            method.bind(dummy, solver)
    except (TypeError, ValueError) as err:
        hint = " (set --config.sample.solver='')" if solver is not None and not method.is_guidance else ""
        raise ConfigError(f"config.inverse.method = {type(method).__name__}: {err}{hint}") from err
