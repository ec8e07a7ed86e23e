"""What every few-step objective shares: reading the batch, the student / target / teacher networks
out of one params pytree, and the per-example distance metrics.

A distillation loss is `loss_fn(params, key, batch) -> (loss, aux)` over a params pytree that holds
several networks, e.g. {"student": ..., "target": ..., "teacher": ...}, trained by
`diffjax.training.make_train_step` with a trainable mask such as {"student": True, "target": False}.

- The student is `params[student]`.
- The target network theta^- is `stop_gradient(params[student])` (iCT, ECT, sCM: no EMA) or, with
  `target="target"`, `params["target"]`, an EMA the caller refreshes after each step with
  `update_target` (Song et al. 2023's CD/CT with mu > 0).
- A teacher is a fixed `Denoiser` (closed over, e.g. an exact one), or `teacher(params) -> Denoiser`
  reading its weights from the params pytree (they stay frozen when the mask says so).
- A curriculum that depends on the training iteration reads it from the batch, `batch["step"]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser
from diffjax.processes import GaussianProcess, per_example
from diffjax.samplers.base import Solver
from diffjax.validation import check_number, check_positive

__all__ = [
    "L2",
    "PseudoHuber",
    "batch_data",
    "batch_iteration",
    "network_params",
    "target_params",
    "resolve_teacher",
    "update_target",
    "check_metric",
]


def batch_data(batch, data_key: str):
    """x0 from an array batch, or batch[data_key] from a dict batch; checked to be (batch, ...) floats."""
    if isinstance(batch, Mapping):
        if data_key not in batch:
            raise ValueError(f"the batch has no entry {data_key!r} (data_key); its entries: {sorted(batch)}")
        x0 = batch[data_key]
    else:
        x0 = batch
    shape, dtype = getattr(x0, "shape", None), getattr(x0, "dtype", None)
    if shape is None or len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"the data must be a floating array of shape (batch, ...), got shape {shape}, dtype {dtype}")
    return x0


def batch_iteration(batch, step_key: str, what: str):
    """The training iteration batch[step_key] (an int scalar) that a curriculum needs."""
    if not (isinstance(batch, Mapping) and step_key in batch):
        raise ValueError(
            f"{what} depends on the training iteration: pass a dict batch with the iteration under "
            f"{step_key!r} (e.g. {{'image': x0, {step_key!r}: state.step}})"
        )
    return jnp.asarray(batch[step_key])


def network_params(params, name: str, what: str = "student"):
    """params[name], with a clear error when the params pytree has no such entry."""
    if not (isinstance(params, Mapping) and name in params):
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"the params pytree must be a dict holding the {what} under {name!r}; got {keys}")
    return params[name]


def target_params(params, student: str, target: str | None):
    """theta^-: stop_gradient(params[student]) when target is None, else stop_gradient(params[target])."""
    return jax.lax.stop_gradient(network_params(params, student if target is None else target, "target network"))


def resolve_teacher(teacher, params) -> Denoiser:
    """A fixed Denoiser, or the Denoiser that `teacher(params)` builds from the params pytree."""
    if isinstance(teacher, Denoiser):
        return teacher
    built = teacher(params)
    if not isinstance(built, Denoiser):
        raise TypeError(f"teacher(params) must return a diffjax.Denoiser, got {type(built).__name__}")
    return built


def check_loss_inputs(apply_fn, process, teacher=None, process_type: type = GaussianProcess) -> None:
    """A loss's network apply_fn is callable, its process a `process_type` and its teacher, if any,
    one `check_teacher` accepts."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    if not isinstance(process, process_type):
        raise TypeError(f"process must be a diffjax {process_type.__name__}, got {type(process).__name__}")
    if teacher is not None:
        check_teacher(teacher, process)


def check_teacher(teacher, process) -> None:
    """teacher is a Denoiser on the loss's process, or a function params -> Denoiser."""
    if not (isinstance(teacher, Denoiser) or callable(teacher)):
        raise TypeError(
            f"teacher must be a diffjax.Denoiser or a function params -> Denoiser, got {type(teacher).__name__}"
        )
    if isinstance(teacher, Denoiser) and teacher.process != process:
        raise ValueError(f"the teacher's process {teacher.process!r} differs from the loss's {process!r}")


def update_target(params, decay: float, *, student: str = "student", target: str = "target"):
    """params with params[target] <- decay * params[target] + (1 - decay) * params[student] (the EMA
    target network theta^- of Song et al. 2023); call it after each train step."""
    decay = check_number("decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay!r}")
    new = jax.tree.map(
        lambda a, p: decay * a + (1.0 - decay) * jax.lax.stop_gradient(p),
        network_params(params, target, "target network"),
        network_params(params, student),
    )
    return {**params, target: new}


@dataclasses.dataclass(frozen=True)
class L2:
    """d(a, b) = ||a - b||^2 / D, the mean squared difference per example (D features)."""

    name: ClassVar[str] = "l2"

    def __call__(self, a, b):
        return per_example(jnp.mean, (a - b).astype(jnp.float32) ** 2)


@dataclasses.dataclass(frozen=True)
class PseudoHuber:
    """d(a, b) = sqrt(||a - b||^2 / D + c^2) - c (Song & Dhariwal 2023, iCT, Sec. 3.3): iCT's
    sqrt(||a - b||^2 + c'^2) - c' with c' = c sqrt(D), divided by sqrt(D); c = 0.00054 is iCT's."""

    c: float = 0.00054
    name: ClassVar[str] = "pseudo_huber"

    def __post_init__(self):
        check_positive("PseudoHuber c", self.c)

    def __call__(self, a, b):
        sq = per_example(jnp.mean, (a - b).astype(jnp.float32) ** 2)
        return jnp.sqrt(sq + self.c**2) - self.c


def check_metric(metric) -> None:
    if isinstance(metric, str) or not callable(metric):
        raise TypeError(f"metric must be an object such as L2() or PseudoHuber(c=0.00054), got {metric!r:.100}")


def check_name(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r:.100}")
    return value


def apply_student(apply_fn: Callable, params):
    """The raw network of the given params: (x, t) -> apply_fn(params, x, t)."""
    return lambda x, t: apply_fn(params, x, t)


def check_teacher_solver(solver) -> None:
    if not isinstance(solver, Solver):
        raise TypeError(f"teacher_solver must be a diffjax Solver such as DDIM() or Heun(), got {solver!r:.100}")
    if solver.stochastic or type(solver).init is not Solver.init or type(solver).run is not Solver.run:
        raise ValueError(
            f"teacher_solver {solver!r} must be a deterministic one-step solver without state "
            "(DDIM(), Euler(), Heun(), EDMHeun())"
        )
