"""diffjax: functional diffusion models in JAX.

The core is pure functions over pytrees: a forward process (a Gaussian path), a denoiser that
turns one network into every prediction view, denoising losses, and `sample()`. Models,
kernels, training and evaluation live in their own sub-packages and are imported on demand.
"""

from diffjax import denoisers, likelihood, losses, processes, samplers
from diffjax.denoisers import Denoiser, EDMPreconditioned, EDMPreconditioning
from diffjax.losses import denoising_loss
from diffjax.processes import (
    EDM,
    VE,
    VP,
    CosineVP,
    DiscreteVP,
    FlowMatching,
    GaussianProcess,
    SubVP,
    get_process,
)
from diffjax.samplers import sample

__version__ = "0.1.0"

__all__ = [  # the modules, then the names in alphabetical order
    "processes",
    "denoisers",
    "losses",
    "samplers",
    "likelihood",
    "CosineVP",
    "Denoiser",
    "denoising_loss",
    "DiscreteVP",
    "EDM",
    "EDMPreconditioned",
    "EDMPreconditioning",
    "FlowMatching",
    "GaussianProcess",
    "get_process",
    "sample",
    "SubVP",
    "VE",
    "VP",
]
