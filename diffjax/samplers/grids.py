"""Time discretizations for sampling: decreasing grids t_0 = t_max > ... > t_steps = t_min.

Every grid is a function `(process, steps, t_min, t_max, **options) -> (steps + 1,) array` and
all of them are expressed through the log-SNR lambda(t), so they mean the same thing for every
process. The end points are exact; interior points go through `process.t_from_log_snr`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes import LOG_SNR_CLIP, GaussianProcess

__all__ = ["GRIDS", "make_grid", "check_grid"]


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


def uniform_grid(process, steps, t_min, t_max):
    """Uniform in t (DDPM, score-SDE)."""
    return jnp.linspace(t_max, t_min, steps + 1, dtype=jnp.float32)


def log_snr_grid(process, steps, t_min, t_max):
    """Uniform in log-SNR lambda (DPM-Solver, Lu et al. 2022)."""
    lam = jnp.linspace(_start_log_snr(process, t_min, t_max), _clipped_log_snr(process, t_min), steps + 1)
    return _from_log_snr(process, lam, t_min, t_max)


def karras_grid(process, steps, t_min, t_max, rho: float = 7.0):
    """EDM's rho-spacing (Karras et al. 2022, eq. 5) of the scaled noise level s = sigma/alpha:
    s_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    if not rho > 0:
        raise ValueError(f"karras grid needs rho > 0, got {rho!r}")
    s_max = jnp.exp(-0.5 * _start_log_snr(process, t_min, t_max))
    s_min = jnp.exp(-0.5 * _clipped_log_snr(process, t_min))
    frac = jnp.linspace(0.0, 1.0, steps + 1)
    s = (s_max ** (1 / rho) + frac * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _from_log_snr(process, -2.0 * jnp.log(s), t_min, t_max)


def quadratic_grid(process, steps, t_min, t_max):
    """Quadratic in t, dense near t_min (DDIM's "quad" spacing, Song et al. 2021)."""
    frac = jnp.linspace(1.0, 0.0, steps + 1) ** 2
    return t_min + frac * (t_max - t_min)


def flow_grid(process, steps, t_min, t_max, sigma_data: float = 0.5):
    """Uniform in tau = s/(s + sigma_data), s = sigma/alpha: the time of the rectified flow
    (alpha = 1 - tau, sigma = tau) of the data divided by sigma_data. Dense where s is near
    sigma_data, where a sample's mode is decided; tau = 1 where alpha = 0."""
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0 and np.isfinite(sigma_data)):
        raise ValueError(f"flow grid needs a finite sigma_data > 0, got {sigma_data!r}")

    def tau(log_snr):  # 1 / (1 + sigma_data e^lam)
        return jax.nn.sigmoid(-0.5 * log_snr - np.log(sigma_data))

    taus = jnp.linspace(tau(_clipped_log_snr(process, t_max)), tau(_clipped_log_snr(process, t_min)), steps + 1)
    lam = jnp.log1p(-taus) - jnp.log(taus) - np.log(sigma_data)
    return _from_log_snr(process, 2.0 * lam, t_min, t_max)


GRIDS = {
    "uniform": uniform_grid,
    "logsnr": log_snr_grid,
    "karras": karras_grid,
    "quadratic": quadratic_grid,
    "flow": flow_grid,
}


def check_grid(name) -> None:
    if not isinstance(name, str) and not hasattr(name, "__len__"):
        raise ValueError(f"grid must be a name in {sorted(GRIDS)} or an array of times, got {name!r}")
    if isinstance(name, str) and name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; known grids: {sorted(GRIDS)}")


def make_grid(name, process: GaussianProcess, steps: int, t_min: float, t_max: float, **options):
    """The grid `name` (or an explicit decreasing array of steps + 1 times) as a float32 array."""
    check_grid(name)
    if isinstance(name, str):
        return GRIDS[name](process, steps, t_min, t_max, **options)
    return _explicit_grid(name, process, steps)


def _explicit_grid(ts, process: GaussianProcess, steps: int):
    """Validate a grid given as numbers (e.g. one saved by `optimize_grid`)."""
    ts = np.asarray(ts, np.float64)
    if ts.shape != (steps + 1,):
        raise ValueError(f"an explicit grid needs steps + 1 = {steps + 1} times, got shape {ts.shape}")
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"an explicit grid must be strictly decreasing, got {ts.tolist()}")
    if ts[-1] < process.t_min or ts[0] > process.t_max:
        raise ValueError(
            f"explicit grid [{ts[-1]}, {ts[0]}] leaves the process range [{process.t_min}, {process.t_max}]"
        )
    return jnp.asarray(ts, jnp.float32)
