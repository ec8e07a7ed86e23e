"""Time discretizations for sampling: decreasing grids t_0 = t_max > ... > t_steps = t_min.

A grid is a small frozen dataclass of its options, called as `grid(process, steps, t_min, t_max)`
to give the (steps + 1,) float32 array of times. The named grids are expressed through the log-SNR
lambda(t), so they mean the same thing for every process; their end points are exact and interior
points go through `process.t_from_log_snr`. `Times` holds an explicit grid (e.g. the one
`optimize_grid` returns), which also fixes the integration range.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes import LOG_SNR_CLIP, DiscreteVP, GaussianProcess
from diffjax.validation import is_finite_real

__all__ = ["Grid", "Uniform", "LogSNR", "Karras", "Quadratic", "FlowTime", "Linspace", "Times", "GRIDS", "as_grid"]


def _clipped_log_snr(process: GaussianProcess, t: float):
    return jnp.clip(process.log_snr(jnp.float32(t)), -LOG_SNR_CLIP, LOG_SNR_CLIP)


def _start_log_snr(process: GaussianProcess, t_min: float, t_max: float):
    """The log-SNR where a log-SNR-spaced grid starts. Where it is -inf at t_max (alpha = 0: flow
    matching, cosine) the clipped value lies within float32 rounding of t_max, so interior points
    would coincide; there the spacing starts 1e-4 of the range below t_max instead (t_max itself
    stays the first grid point)."""
    lam = _clipped_log_snr(process, t_max)
    floor = _clipped_log_snr(process, t_max - 1e-4 * (t_max - t_min))
    return jnp.where(lam <= -LOG_SNR_CLIP, floor, lam)


def _from_log_snr(process, lam, t_min, t_max):
    """Map log-SNR values to times and pin the end points exactly."""
    ts = process.t_from_log_snr(lam)
    return ts.at[0].set(t_max).at[-1].set(t_min)


def _refuse(grid, name: str, allowed: str) -> None:
    value = getattr(grid, name)
    raise ValueError(
        f"{type(grid).__name__} grid option {name}={value!r:.100} is not allowed; {name} must be {allowed}"
    )


def _check_positive(grid, name: str) -> None:
    value = getattr(grid, name)
    if not (is_finite_real(value) and value > 0):
        _refuse(grid, name, "a finite number > 0")


@dataclasses.dataclass(frozen=True)
class Grid:
    """Base class: `grid(process, steps, t_min, t_max)` -> the decreasing (steps + 1,) times."""

    name: ClassVar[str] = ""
    ends_at_t_min: ClassVar[bool] = True  # False: the last time lies above t_min (`Linspace`)

    def __call__(self, process: GaussianProcess, steps: int, t_min: float, t_max: float):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Uniform(Grid):
    """Uniform in t (DDPM, score-SDE)."""

    name: ClassVar[str] = "uniform"

    def __call__(self, process, steps, t_min, t_max):
        return jnp.linspace(t_max, t_min, steps + 1, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class LogSNR(Grid):
    """Uniform in log-SNR lambda (DPM-Solver, Lu et al. 2022)."""

    name: ClassVar[str] = "logsnr"

    def __call__(self, process, steps, t_min, t_max):
        lam = jnp.linspace(_start_log_snr(process, t_min, t_max), _clipped_log_snr(process, t_min), steps + 1)
        return _from_log_snr(process, lam, t_min, t_max)


@dataclasses.dataclass(frozen=True)
class Karras(Grid):
    """EDM's rho-spacing (Karras et al. 2022, eq. 5) of the scaled noise level s = sigma/alpha:
    s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho."""

    name: ClassVar[str] = "karras"
    rho: float = 7.0

    def __post_init__(self):
        _check_positive(self, "rho")

    def __call__(self, process, steps, t_min, t_max):
        rho = float(self.rho)
        s_max = jnp.exp(-0.5 * _start_log_snr(process, t_min, t_max))
        s_min = jnp.exp(-0.5 * _clipped_log_snr(process, t_min))
        frac = jnp.linspace(0.0, 1.0, steps + 1)
        s = (s_max ** (1 / rho) + frac * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        return _from_log_snr(process, -2.0 * jnp.log(s), t_min, t_max)


@dataclasses.dataclass(frozen=True)
class Quadratic(Grid):
    """Quadratic in t, dense near t_min (DDIM's "quad" spacing, Song et al. 2021)."""

    name: ClassVar[str] = "quadratic"

    def __call__(self, process, steps, t_min, t_max):
        frac = jnp.linspace(1.0, 0.0, steps + 1) ** 2
        return t_min + frac * (t_max - t_min)


@dataclasses.dataclass(frozen=True)
class FlowTime(Grid):
    """Uniform in tau = s/(s + sigma_data), s = sigma/alpha: the time of the rectified flow
    (alpha = 1 - tau, sigma = tau) of the data divided by sigma_data. Dense where s is near
    sigma_data, where a sample's mode is decided; tau = 1 where alpha = 0."""

    name: ClassVar[str] = "flow_time"
    sigma_data: float = 0.5

    def __post_init__(self):
        _check_positive(self, "sigma_data")

    def __call__(self, process, steps, t_min, t_max):
        log_sigma_data = np.log(self.sigma_data)

        def tau(log_snr):  # 1 / (1 + sigma_data e^lam)
            return jax.nn.sigmoid(-0.5 * log_snr - log_sigma_data)

        taus = jnp.linspace(tau(_clipped_log_snr(process, t_max)), tau(_clipped_log_snr(process, t_min)), steps + 1)
        lam = jnp.log1p(-taus) - jnp.log(taus) - log_sigma_data
        return _from_log_snr(process, 2.0 * lam, t_min, t_max)


@dataclasses.dataclass(frozen=True)
class Linspace(Grid):
    """diffusers' default timestep spacing ("linspace", with the final step to sigma = 0): steps + 2
    points evenly spaced in t from t_max down to t_min, the last one dropped, so the grid ends one
    spacing above t_min and the final denoising happens there, as diffusers' DPM-Solver++, UniPC and
    DEIS schedulers end with the x0-prediction at their last timestep. On a discrete DDPM chain
    (`DiscreteVP`) the points are rounded to the chain's steps as diffusers rounds its timesteps
    (round half to even), so the grid is exactly diffusers'; in continuous time it is uniform in t
    (which suits VP-type processes, not EDM's t = sigma)."""

    name: ClassVar[str] = "linspace"
    ends_at_t_min: ClassVar[bool] = False

    def __call__(self, process, steps, t_min, t_max):
        fractions = np.linspace(1.0, 0.0, steps + 2)[:-1]
        if isinstance(process, DiscreteVP):  # diffusers' timesteps k = i - 1 at t = i / N
            n = process.num_steps
            k_min, k_max = float(t_min) * n - 1, float(t_max) * n - 1
            ts = (np.round(k_min + fractions * (k_max - k_min)) + 1) / n
        else:
            ts = float(t_min) + fractions * (float(t_max) - float(t_min))
        return jnp.asarray(ts, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Times(Grid):
    """An explicit, strictly decreasing grid of times; its first and last times are the range
    the sampler integrates over (the prior is drawn at times[0])."""

    name: ClassVar[str] = "times"
    times: tuple[float, ...] = ()

    def __post_init__(self):
        try:
            ts = np.asarray(self.times, np.float64)
        except (TypeError, ValueError):
            ts = None
        if ts is None or ts.ndim != 1 or ts.size < 2 or not np.all(np.isfinite(ts)):
            _refuse(self, "times", "a 1-D sequence of at least 2 finite numbers")
        if not np.all(np.diff(ts) < 0):
            raise ValueError(f"an explicit grid must be strictly decreasing, got {ts.tolist()}")
        object.__setattr__(self, "times", tuple(float(t) for t in ts))

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def check(self, process: GaussianProcess, steps: int) -> None:
        if self.steps != steps:
            raise ValueError(f"an explicit grid needs steps + 1 = {steps + 1} times, got {len(self.times)}")
        if self.times[-1] < process.t_min or self.times[0] > process.t_max:
            raise ValueError(
                f"explicit grid [{self.times[-1]}, {self.times[0]}] leaves the process range "
                f"[{process.t_min}, {process.t_max}]"
            )

    def __call__(self, process, steps, t_min, t_max):
        self.check(process, steps)
        return jnp.asarray(self.times, jnp.float32)


GRIDS: dict[str, type[Grid]] = {cls.name: cls for cls in (Uniform, LogSNR, Karras, Quadratic, FlowTime, Linspace)}


def as_grid(grid) -> Grid:
    """A Grid instance, or an explicit decreasing array of times wrapped as `Times`."""
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, str):
        raise TypeError(
            f"grid must be a Grid instance (e.g. LogSNR(), Karras(rho=7.0)) or an array of times, got the "
            f"string {grid!r:.100}; to build one from a name use validation.build_named(GRIDS, name, options, 'grid') "
            f"with a name in {sorted(GRIDS)}"
        )
    if isinstance(grid, (list, tuple, np.ndarray, jax.Array)):
        return Times(tuple(np.asarray(grid, np.float64).reshape(-1).tolist()) if np.ndim(grid) == 1 else grid)
    raise TypeError(f"grid must be a Grid instance or an array of times, got {grid!r:.100}")
