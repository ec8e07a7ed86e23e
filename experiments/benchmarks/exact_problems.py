"""The sampler suite's problems: data we did not design, each with an exact x0-denoiser.

Three classes, every one exposing `x0_fn(x_t, alpha, sigma)` (VP convention x_t = alpha x0 + sigma eps):

- "gaussian": zero-mean Gaussians with power-law spectra (1 + k)^-p in random bases
  (`diffjax.data.exact.power_law_gaussian`); the probability-flow solution is closed-form.
- "images": the ideal (empirical) denoiser of a subset of real images in [-1, 1] (`EmpiricalData`):
  MNIST, Fashion-MNIST, CIFAR-10 (from the JPEG tar) and sklearn's 8x8 digits.
- "mixture": Gaussian mixtures (`diffjax.data.toy.GaussianMixture`) at several scales, separations and
  anisotropies.

`build_problems(full=False)` returns them at the default (fast) or full size.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import tarfile
from typing import Any

import jax
import numpy as np

from diffjax.data.exact import EmpiricalData, power_law_gaussian
from diffjax.data.toy import GaussianMixture

SHARED_DATA = os.environ.get("DIFFJAX_SHARED_DATA", "/work/shared/data")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One exact problem: `data` has `posterior_mean(x, alpha, sigma)` (the exact x0-denoiser).
    `origin`: where the data came from when the name does not say it all (a trained run's directory and
    step, trained_problems.py); stored with the results, and checked when a run resumes."""

    name: str
    kind: str  # "gaussian" | "images" | "mixture" | "trained"
    data: Any
    batch: int  # samples drawn per run
    origin: str = ""

    @property
    def dim(self) -> int:
        return int(self.data.dim)

    def x0_fn(self):
        """x0_fn(x_t, alpha, sigma) -> E[x0 | x_t] (jitted; numpy in, JAX array out)."""
        fn = jax.jit(self.data.posterior_mean)
        return lambda x, alpha, sigma: fn(np.asarray(x, np.float32), alpha, sigma)


# ------------------------------------------------------------------------------------------------
# Real image sets, flattened to [-1, 1]
# ------------------------------------------------------------------------------------------------


def _to_unit(images_uint8) -> np.ndarray:
    x = np.asarray(images_uint8, np.float32) / 127.5 - 1.0
    return x.reshape(x.shape[0], -1)


def load_mnist(n: int) -> np.ndarray:
    with np.load(os.path.join(SHARED_DATA, "mnist.npz")) as f:
        return _to_unit(f["x_train"][:n])


def load_fashion_mnist(n: int) -> np.ndarray:
    with gzip.open(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"), "rb") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return _to_unit(images[:n])


def load_cifar10(n: int) -> np.ndarray:
    """The first n training images in a fixed, class-interleaved order (by file name, then class)."""
    from PIL import Image  # noqa: PLC0415 (experiments only: Pillow is a dependency)

    per_class = -(-n // 10)
    with tarfile.open(os.path.join(SHARED_DATA, "cifar10-jpeg.tar")) as tar:
        members = [
            m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/") and m.name.endswith(".jpg")
        ]
        by_class: dict[str, list] = {}
        for m in sorted(members, key=lambda m: m.name):
            by_class.setdefault(m.name.split("/")[1], []).append(m)
        chosen = [by_class[c][i] for i in range(per_class) for c in sorted(by_class)][:n]
        images = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")) for m in chosen]
    return _to_unit(np.stack(images))


def load_digits_8x8(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits  # noqa: PLC0415

    x = load_digits().images[:n].astype(np.float32)  # 0..16
    return (x / 8.0 - 1.0).reshape(x.shape[0], -1)


IMAGE_SETS = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "digits": load_digits_8x8,
}


# ------------------------------------------------------------------------------------------------
# Mixtures
# ------------------------------------------------------------------------------------------------


def make_mixture(seed: int, dim: int, components: int, separation: float, scale: float, anisotropy: float):
    """K components in `dim` dimensions: means at distance ~`separation` in random directions; component
    stds `scale` times a per-dimension factor log-uniform in [1/anisotropy, 1] and a per-component factor
    uniform in [0.5, 1]; random weights."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((components, dim))
    means = separation / np.sqrt(2) * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    per_dim = np.exp(-np.log(anisotropy) * rng.uniform(0, 1, (components, dim)))
    stds = scale * rng.uniform(0.5, 1.0, (components, 1)) * per_dim
    weights = rng.uniform(0.5, 1.5, components)
    return GaussianMixture.create(weights / weights.sum(), means, stds)


# (name, dim, components, separation, scale, anisotropy)
MIXTURES = [
    ("mix16_sep6_iso", 16, 4, 6.0, 0.5, 1.0),
    ("mix16_sep2_aniso10", 16, 4, 2.0, 0.3, 10.0),
    ("mix16_sep20_aniso100", 16, 4, 20.0, 2.0, 100.0),
]
MIXTURES_FULL = MIXTURES + [("mix32_sep3_aniso30_k8", 32, 8, 3.0, 1.0, 30.0)]

# (name, dim, exponent, scale)
GAUSSIANS = [("gauss256_p1", 256, 1.0, 1.0), ("gauss256_p2", 256, 2.0, 1.0), ("gauss256_p0.5", 256, 0.5, 0.5)]
GAUSSIANS_FULL = GAUSSIANS + [
    ("gauss64_p1", 64, 1.0, 1.0),
    ("gauss1024_p3", 1024, 3.0, 2.0),
    ("gauss3072_p1", 3072, 1.0, 1.0),
]


def build_problems(full: bool = False) -> list[Problem]:
    """The suite's problems: the default size runs in minutes on 2 CPU cores, `full` is the issue's."""
    problems = []
    for i, (name, dim, exponent, scale) in enumerate(GAUSSIANS_FULL if full else GAUSSIANS):
        data = power_law_gaussian(jax.random.key(100 + i), dim, exponent, scale)
        problems.append(Problem(name, "gaussian", data, 1024 if full else 256))
    sizes = {"digits": 1797, "mnist": 2000, "fashion_mnist": 2000, "cifar10": 2000} if full else None
    for name, loader in IMAGE_SETS.items():
        n = sizes[name] if full else (1797 if name == "digits" else 500 if name == "cifar10" else 1000)
        problems.append(Problem(f"{name}{n}", "images", EmpiricalData.create(loader(n)), 1000 if full else 200))
    for seed, (name, dim, k, sep, scale, aniso) in enumerate(MIXTURES_FULL if full else MIXTURES):
        problems.append(
            Problem(name, "mixture", make_mixture(seed, dim, k, sep, scale, aniso), 20000 if full else 4096)
        )
    return problems
