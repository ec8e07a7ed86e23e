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
from diffjax.control.operators import measure
from diffjax.control.posterior import posterior_sample
from diffjax.evaluation import psnr
from diffjax.io import atomic_write
from diffjax.samplers import SOLVERS
from diffjax.training import eval_metrics as eval_lib
from diffjax.training.config import ConfigError
from diffjax.training.from_config import inverse_problem_from_config
from diffjax.training.images import save_image_grid, to_uint8
from diffjax.training.loop import evaluation_split, load_for_config
from diffjax.validation import build_named

__all__ = ["reconstruct_from_checkpoint"]


def reconstruct_from_checkpoint(config, workdir: str, devices=None) -> dict:
    """Reconstruct config.inverse.num_images images of the evaluation split from their measurements
    with the EMA parameters of the newest checkpoint. Class-conditional runs use the null class (the
    unconditional prior that label dropout trains). Solver methods (DPS, DDRM, ...) run their own
    steps; guidance methods (PiGDM, DDNM) run config.sample.solver ('' = DDIM with eta = 1).
    Returns PSNR (dB, images in [-1, 1]) of the reconstructions and of A^+ y, and the RMS
    measurement residual |y - A x|."""
    if not config.inverse.operator:
        raise ConfigError("config.inverse.operator is '' (plain sampling); name an operator to reconstruct")
    loaded, run = load_for_config(config, workdir, devices)
    if loaded.num_classes and float(loaded.config.train.label_dropout) <= 0:
        raise ConfigError(
            "reconstruction needs an unconditional prior: this class-conditional run was trained with "
            "train.label_dropout = 0, so its null class is untrained"
        )
    operator, method, noise_std = inverse_problem_from_config(config, run.image_shape)
    num = int(config.inverse.num_images)
    images, _ = eval_lib.split_images(config.data, evaluation_split(data_lib.dataset_info(config.data)), num)
    if len(images) < num:
        raise ConfigError(f"config.inverse.num_images = {num}: the evaluation split has only {len(images)} images")
    truth = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    observation = measure(operator, run.key("inverse_noise"), truth, noise_std)
    labels = jnp.full((num,), loaded.num_classes, jnp.int32) if loaded.num_classes else None
    denoiser = loaded.denoiser_for(labels=labels)
    s = config.sample
    solver = build_named(SOLVERS, s.solver, s.solver_options.to_dict(), "sample.solver") if s.solver else None

    def reconstruct(key):
        return posterior_sample(denoiser, observation, key, method, solver=solver, steps=int(s.steps)).samples

    start = time.perf_counter()
    x = np.asarray(jax.jit(reconstruct)(run.key("inverse")))
    seconds = time.perf_counter() - start
    baseline = np.asarray(operator.pinv(observation.y))
    residual = np.sqrt(np.mean(np.sum(np.asarray(observation.residual(jnp.asarray(x))) ** 2, axis=-1)))
    summary = {
        "step": loaded.step,
        "operator": config.inverse.operator,
        "method": config.inverse.method,
        "noise_std": noise_std,
        "num_images": num,
        "psnr": float(np.mean(psnr(x, np.asarray(truth)))),
        "psnr_pseudo_inverse": float(np.mean(psnr(baseline, np.asarray(truth)))),
        "measurement_residual": float(residual),
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
