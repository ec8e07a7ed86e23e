"""A trained run's network as a sampler-suite problem: no exact answer, a converged reference solve instead.

The exact problems (exact_problems.py) have denoisers no network has: the ideal denoiser of a training set
maps every trajectory onto a training image, and Gaussians and mixtures are smooth everywhere. A trained
network is neither, and solvers rank differently on it (experiments/results/mnist_fid_per_solver.md). So
the suite can take trained runs too (`--trained-run`): the run's EMA network is the problem's denoiser,
written in the suite's convention `posterior_mean(x, alpha, sigma)` (VP: x = alpha x0 + sigma eps, x
flattened), and the error is measured, as on image sets, against a converged reference solve from the
same noise.

Only runs trained under the EDM process are accepted: their denoiser D(x, s) is defined at every noise
level s = sigma / alpha of another process (the preconditioning scales the input), so the same network
can be sampled under the DDPM chain, where diffusers' schedulers run, and under its own process. The
DDPM chain starts at s ~ 157, above EDM's sigma_max = 80, so its first evaluation extrapolates the
network beyond its training range, as a diffusers user of such a network would.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffjax.processes import EDM
from diffjax.training.build import network, sampling_labels
from diffjax.training.load import load_run
from experiments.benchmarks.exact_problems import Problem

TRAINED_PROCESSES = ("ddpm", "edm")  # the processes a trained entry is sampled under


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
    """A trained EDM denoiser D(x, s) over flattened images: posterior_mean(x, alpha, sigma) =
    D(x / alpha, sigma / alpha), the network's estimate of E[x0 | x] in the VP convention. `labels`:
    a class-conditional network's labels, one per sample of the batch (None: unconditional)."""

    params: Any
    labels: jax.Array | None
    to_denoiser: Callable = dataclasses.field(metadata=dict(static=True))  # to_denoiser(net) -> Denoiser
    apply: Callable = dataclasses.field(metadata=dict(static=True))
    image_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def dim(self) -> int:
        return math.prod(self.image_shape)

    def posterior_mean(self, x, alpha, sigma):
        """x: (batch, dim); alpha, sigma: scalars or (batch,)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), images {self.image_shape} flat; got {x.shape}")
        if self.labels is not None and x.shape[0] != self.labels.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples; this problem's labels are for {self.labels.shape[0]}")
        batch = x.shape[0]
        alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (batch,))
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
        images = jnp.reshape(x / alpha[:, None], (batch,) + self.image_shape)
        denoiser = self.to_denoiser(network(self.apply, self.params, self.labels))
        return jnp.reshape(denoiser.x0(images, sigma / alpha), x.shape)


def trained_problem(workdir: str, batch: int = 64) -> Problem:
    """The EMA network of the run in `workdir` (its newest checkpoint) as a suite problem of `batch`
    samples named trained_<data set><image size>_<model> (e.g. trained_mnist28_unet-small). A
    class-conditional run is sampled as its own sampler does (`sampling_labels`: 0, 1, ... cycling over
    the classes), without guidance."""
    loaded = load_run(workdir)
    if not isinstance(loaded.process, EDM):
        raise ValueError(
            f"--trained-run {workdir}: its process is {loaded.process.name!r}; the suite takes runs trained "
            "under 'edm' (their denoiser is defined at every noise level another process visits)"
        )
    if loaded.run.decode is not None:
        raise ValueError(f"--trained-run {workdir}: a latent run; the suite samples networks in data space")
    labels = sampling_labels(batch, loaded.num_classes) if loaded.num_classes else None
    data = TrainedNetwork(loaded.ema_params, labels, loaded.run.to_denoiser, loaded.apply, tuple(loaded.image_shape))
    name = f"trained_{loaded.config.data.name}{loaded.image_shape[0]}_{loaded.config.model.name}"
    return Problem(name, "trained", data, batch, origin=f"{os.path.abspath(loaded.workdir)} at step {loaded.step}")
