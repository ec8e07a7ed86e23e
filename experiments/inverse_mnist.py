"""Inverse problems on MNIST: inpainting, 4x super-resolution and deblurring with every posterior sampler,
PSNR and measurement residual per method, run time at equal NFE against plain sampling, and an image grid
per problem (rows: truth, A^+ y, then one row per method).

    python -m experiments.inverse_mnist --workdir=<a trained MNIST run> [--num_images=8 --steps=50]
    python -m experiments.inverse_mnist                  # no trained run: the exact denoiser of a
                                                          # 10-component diagonal Gaussian mixture fitted
                                                          # to the MNIST training set (one per digit)

writes experiments/results/<name>.{json,md} and <name>_<problem>.png (--name, default inverse_mnist).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from diffjax import processes as P
from diffjax.control import operators as O
from diffjax.control import posterior as Po
from diffjax.data.toy import GaussianMixture
from diffjax.evaluation import psnr
from diffjax.samplers import DDIM, sample
from diffjax.training.images import save_image_grid
from diffjax.training.load import load_run
from experiments.benchmarks.common import RESULTS_DIR, markdown_table, write_results


def problems(shape):
    h, w, _ = shape
    return [
        ("inpainting (centre box)", O.box_inpainting(shape, h // 4, w // 4, h // 2, w // 2), 0.0),
        ("inpainting (25% pixels)", O.random_inpainting(shape, 0.25, seed=0), 0.0),
        ("4x super-resolution", O.super_resolution(shape, 4), 0.0),
        ("Gaussian deblurring (std 2), s=0.05", O.gaussian_blur(shape, 2.0), 0.05),
    ]


def methods(noise):
    out = [
        ("DPS", Po.DPS(scale=1.0)),
        ("PiGDM", Po.PiGDM(data_std=0.5)),
        ("DDRM", Po.DDRM()),
        ("DiffPIR", Po.DiffPIR()),
        ("DAPS", Po.DAPS(data_std=0.5)),
        ("RED-diff", Po.RedDiff()),
    ]
    if noise == 0:
        out += [("DDNM", Po.DDNM()), ("replacement", Po.Replacement())]
    return out


def timed(fn, key):
    """Seconds of one call of jit(fn)(key) after compilation, and its output."""
    compiled = jax.jit(fn).lower(key).compile()
    compiled(key).block_until_ready()
    start = time.perf_counter()
    out = compiled(key).block_until_ready()
    return time.perf_counter() - start, out


def mnist_mixture(data_path: str) -> GaussianMixture:
    """One diagonal Gaussian per digit (mean and per-pixel std of its training images, std >= 0.05),
    weighted by the digit frequencies; images scaled to [-1, 1]."""
    data = np.load(data_path)
    x = data["x_train"].reshape(len(data["x_train"]), -1).astype(np.float64) / 127.5 - 1.0
    labels = data["y_train"]
    weights = np.bincount(labels, minlength=10) / len(labels)
    means = np.stack([x[labels == k].mean(0) for k in range(10)])
    stds = np.stack([np.maximum(x[labels == k].std(0), 0.05) for k in range(10)])
    return GaussianMixture.create(weights, means, stds)


def main(workdir: str | None, num_images: int, steps: int, data_path: str, results_name: str = "inverse_mnist"):
    if workdir:
        run = load_run(workdir)
        denoiser, shape, model = run.denoiser, tuple(run.image_shape), f"trained run {workdir} (step {run.step})"
    else:
        denoiser, shape = mnist_mixture(data_path).denoiser(P.VP()), (28, 28, 1)
        model = "exact denoiser of a 10-component diagonal Gaussian mixture fitted to MNIST (VP process)"
    images = np.load(data_path)["x_test"][:num_images].astype(np.float32) / 127.5 - 1.0
    truth = images.reshape((num_images,) + shape)
    key = jax.random.key(0)
    plain, _ = timed(
        lambda k: sample(denoiser, k, (num_images,) + shape, solver=DDIM(eta=1.0), steps=steps).samples, key
    )
    rows, payload = [], {"model": model, "steps": steps, "num_images": num_images, "plain_seconds": plain, "runs": []}
    for name, op, noise in tqdm(problems(shape), desc="problems"):
        obs = O.measure(op, jax.random.key(1), jnp.asarray(truth), noise)
        grid = [truth, np.asarray(op.pinv(obs.y))]
        for method_name, method in methods(noise):

            def go(k, method=method):
                return Po.posterior_sample(denoiser, obs, k, method, steps=steps).samples

            seconds, x = timed(go, key)
            x = np.asarray(x)
            grid.append(x)
            residual = float(np.sqrt(np.mean(np.sum(np.asarray(obs.residual(jnp.asarray(x))) ** 2, axis=-1))))
            value = float(np.mean(psnr(x, truth)))
            rows.append(
                [name, method_name, f"{value:.2f}", f"{residual:.3f}", f"{seconds:.2f}", f"{seconds / plain:.2f}"]
            )
            payload["runs"].append(
                dict(
                    problem=name,
                    method=method_name,
                    psnr=value,
                    residual=residual,
                    seconds=seconds,
                    ratio=seconds / plain,
                )
            )
            print(rows[-1])
        slug = "".join(c if c.isalnum() else "_" for c in name.split(",")[0].lower()).strip("_")
        png = os.path.join(RESULTS_DIR, f"{results_name}_{slug}.png")
        save_image_grid(np.concatenate(grid), png, columns=num_images, upscale=2)
    md = [
        "# Inverse problems on MNIST",
        "",
        f"Prior: {model}.",
        "",
        f"{num_images} test images, {steps} steps per method (about {steps + 1} network evaluations; DPS and PiGDM "
        "also back-propagate through the network each step). PSNR on [-1, 1] images (clipped); residual = RMS "
        "over images of |y - A x|. `s` = seconds for the batch after compilation; `ratio` = against plain "
        f"DDIM(eta=1) sampling at the same steps ({plain:.2f} s), on a shared 2-core CPU. Images: "
        f"{results_name}_<problem>.png, rows: truth, A^+ y, then the methods in the order of the table.",
        "",
        markdown_table(["problem", "method", "PSNR dB", "residual", "s", "ratio"], rows),
    ]
    write_results(results_name, payload, "\n".join(md))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="a trained MNIST run (load_run); default: the mixture prior")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", default="/work/shared/data/mnist.npz")
    parser.add_argument("--name", default="inverse_mnist", help="results file name (experiments/results/<name>.*)")
    args = parser.parse_args()
    main(args.workdir, args.num_images, args.steps, args.data, args.name)
