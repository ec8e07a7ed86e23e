"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", EDM2, Sec. 3 and App. C).

A power-function EMA of exponent gamma averages the parameters theta_1..theta_t of steps 1..t with
the per-step decay

    beta(t) = (1 - 1/t)^(gamma + 1),   avg_t = beta(t) avg_{t-1} + (1 - beta(t)) theta_t,

which gives theta_i the weight w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1): exactly the mass
of the profile p(tau) = (gamma + 1) tau^gamma / t^(gamma+1) on (i-1, i]. The profile's standard
deviation relative to its length is sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))).

Post-hoc EMA: during training a few profiles are tracked (`train.posthoc_ema = (0.05, 0.10)`) and
saved every `train.posthoc_ema_every` steps; afterwards any sigma_rel at any saved step is
reconstructed as the combination of the snapshots whose profiles best match the target profile in
L2 (normal equations with the closed-form inner products of power profiles). Because each snapshot
is exactly the integral of its profile against the piecewise-constant parameter trajectory, the
reconstruction error of every parameter is at most ||sum_k x_k p_k - p_target||_2 ||theta||_2
(Cauchy-Schwarz); `PosthocSolution.residual` is the first factor.

    python -m diffjax.training.posthoc_ema --workdir W --sigma_rel 0.08 --out ema_0.08.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from diffjax.io import atomic_write, interactive
from diffjax.training.state import ParamAverage, leaf_names

__all__ = [
    "MAX_SIGMA_REL",
    "SNAPSHOT_DIR",
    "PosthocSolution",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
    "power_ema_decay",
    "power_ema_weights",
    "power_ema",
    "power_profile_inner",
    "solve_posthoc",
    "save_snapshot",
    "snapshot_steps",
    "reconstruct_posthoc_ema",
    "params_like",
    "main",
]

# The exponent where sigma_rel(gamma) peaks: d/dgamma log sigma_rel^2 = 0 <=> gamma^2 + 3 gamma + 1 = 0.
_GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
# Where the snapshots go, beside workdir/checkpoints.
SNAPSHOT_DIR = "posthoc_ema"
_SNAPSHOT_NAME = re.compile(r"^step_(\d+)\.npz$")


def gamma_to_sigma_rel(gamma):
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) (EDM2 Eq. 123), gamma > -1."""
    gamma = np.asarray(gamma, np.float64)
    if np.any(~np.isfinite(gamma)) or np.any(gamma <= -1):
        raise ValueError(f"gamma={gamma!r}: the power-function exponent must be a finite number > -1")
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


MAX_SIGMA_REL = float(gamma_to_sigma_rel(_GAMMA_AT_MAX))  # ~0.300: no power profile is wider


def sigma_rel_to_gamma(sigma_rel) -> float:
    """The exponent of relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (EDM2 Eq. 126)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float, np.floating, np.integer)):
        raise TypeError(f"sigma_rel={sigma_rel!r}: must be a number in (0, {MAX_SIGMA_REL:.4f})")
    s = float(sigma_rel)
    if not 0.0 < s < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel!r}: must be in (0, {MAX_SIGMA_REL:.4f}), the widest power profile")
    inv = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_ema_decay(gamma: float, t):
    """beta(t) = (1 - 1/t)^(gamma+1) for the update that makes t steps averaged (t >= 1; beta(1) = 0)."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def power_ema_weights(gamma: float, num_steps: int) -> np.ndarray:
    """w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), i = 1..t: the weight of step i's
    parameters in the power EMA after t = num_steps steps (float64, sums to 1)."""
    i = np.arange(1, int(num_steps) + 1, dtype=np.float64) / num_steps
    return i ** (gamma + 1) - (i - 1.0 / num_steps) ** (gamma + 1)


def power_ema(sigma_rel: float) -> ParamAverage:
    """The power-function EMA of relative width sigma_rel as a ParamAverage (`state.ema`'s shape):
    avg <- avg + (1 - beta(t)) (params - avg) with t = step + 1, 1 - beta computed as
    -expm1((gamma+1) log1p(-1/t)), accurate in float32 for long runs."""
    gamma = sigma_rel_to_gamma(sigma_rel)

    def init(params):
        return jax.tree.map(jnp.copy, params)

    def update(average, params, step):
        t = step.astype(jnp.float32) + 1.0
        weight = -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))
        return jax.tree.map(lambda a, p: a + weight.astype(a.dtype) * (p - a), average, params)

    return ParamAverage(init, update)


def power_profile_inner(gamma_a, t_a, gamma_b, t_b) -> np.ndarray:
    """<p_a, p_b> = int_0^min(t_a, t_b) p_a p_b dtau of the profiles p(tau) = (gamma+1) tau^gamma / t^(gamma+1)
    on [0, t]: (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) t_a^(ga+1) t_b^(gb+1)), m = min(t_a, t_b),
    evaluated in logs (broadcasting, float64)."""
    ga, ta, gb, tb = (np.asarray(x, np.float64) for x in (gamma_a, t_a, gamma_b, t_b))
    log_m = np.log(np.minimum(ta, tb))
    log_value = (
        np.log(ga + 1)
        + np.log(gb + 1)
        - np.log(ga + gb + 1)
        + (ga + gb + 1) * log_m
        - (ga + 1) * np.log(ta)
        - (gb + 1) * np.log(tb)
    )
    return np.exp(log_value)


@dataclasses.dataclass(frozen=True)
class PosthocSolution:
    """coefficients[k] multiplies snapshot k (they sum to 1); residual = ||sum_k x_k p_k - p||_2
    and relative_residual = residual / ||p||_2 of the target profile p."""

    coefficients: np.ndarray
    residual: float
    relative_residual: float


def solve_posthoc(snapshot_gammas, snapshot_steps, target_gamma: float, target_step: float) -> PosthocSolution:
    """Least-squares weights of snapshots (power EMAs of exponents snapshot_gammas saved at
    snapshot_steps) whose combined profile is nearest the target's (EDM2 Algorithm 3): the
    minimum-norm solution of A x = b, A_kl = <p_k, p_l>, b_k = <p_k, p_target>, rescaled to sum to
    1 (a constant trajectory is then reproduced exactly)."""
    g = np.asarray(snapshot_gammas, np.float64).reshape(-1)
    t = np.asarray(snapshot_steps, np.float64).reshape(-1)
    if g.shape != t.shape or g.size == 0:
        raise ValueError(f"snapshot_gammas and snapshot_steps: need equal non-zero lengths, got {g.size} and {t.size}")
    if np.any(t < 1) or not target_step >= 1:
        raise ValueError(f"steps must be >= 1, got snapshot steps {t.tolist()} and target_step={target_step!r}")
    a = power_profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])
    b = power_profile_inner(g, t, target_gamma, target_step)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / np.sum(x)
    target = float(power_profile_inner(target_gamma, target_step, target_gamma, target_step))
    squared = float(x @ a @ x - 2.0 * x @ b + target)
    residual = math.sqrt(max(squared, 0.0))
    return PosthocSolution(x, residual, residual / math.sqrt(target))


# ------------------------------------------------------------------------------------------------
# snapshots on disk: workdir/posthoc_ema/step_<n>.npz
# ------------------------------------------------------------------------------------------------


def save_snapshot(workdir: str, step: int, sigma_rels: Sequence[float], averages: Sequence[Any]) -> str:
    """Write the tracked averages (host arrays, one pytree per sigma_rel) of `step` atomically to
    workdir/posthoc_ema/step_<step>.npz; returns its path. Floats numpy cannot store (bfloat16)
    are written as float32, which holds them exactly."""
    if len(sigma_rels) != len(averages):
        raise ValueError(f"{len(sigma_rels)} sigma_rels for {len(averages)} averages")
    arrays = {"step": np.asarray(int(step), np.int64), "sigma_rels": np.asarray(sigma_rels, np.float64)}
    for k, average in enumerate(averages):
        for name, leaf in zip(leaf_names(average), jax.tree.leaves(average)):
            leaf = np.asarray(leaf)
            if leaf.dtype.kind == "V" or (jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype.itemsize < 4):
                leaf = leaf.astype(np.float32)
            arrays[f"{k}:{name}"] = leaf
    directory = os.path.join(workdir, SNAPSHOT_DIR)
    os.makedirs(directory, exist_ok=True)
    return atomic_write(os.path.join(directory, f"step_{int(step):07d}.npz"), lambda f: np.savez(f, **arrays))


def snapshot_steps(workdir: str) -> list[int]:
    """The steps of the snapshots in workdir/posthoc_ema (sorted)."""
    directory = os.path.join(workdir, SNAPSHOT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_SNAPSHOT_NAME.match, os.listdir(directory)) if m)


def _snapshot_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, SNAPSHOT_DIR, f"step_{step:07d}.npz")


def reconstruct_posthoc_ema(
    workdir: str, sigma_rel: float, *, step: int | None = None
) -> tuple[dict[str, np.ndarray], PosthocSolution]:
    """The parameters of the power EMA of width `sigma_rel` at `step` (default: the newest
    snapshot), combined from every snapshot in workdir/posthoc_ema up to that step (float64
    accumulation, stored in each leaf's dtype). Returns ({leaf name: array}, solution); leaf names
    are jax.tree_util.keystr paths of the params pytree (see `params_like`)."""
    target_gamma = sigma_rel_to_gamma(sigma_rel)
    steps = snapshot_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots in {os.path.join(workdir, SNAPSHOT_DIR)}; train with train.posthoc_ema set"
        )
    step = steps[-1] if step is None else int(step)
    used = [s for s in steps if s <= step]
    if not used:
        raise ValueError(f"step={step}: no snapshot at or before it; snapshots exist at steps {steps}")
    files = []  # (step, profile index, gamma)
    for s in used:
        with np.load(_snapshot_path(workdir, s)) as z:
            files += [(s, k, sigma_rel_to_gamma(float(r))) for k, r in enumerate(z["sigma_rels"])]
    solution = solve_posthoc([f[2] for f in files], [f[0] for f in files], target_gamma, step)
    total: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    bar = tqdm.tqdm(total=len(used), unit="snapshot", disable=not interactive(), file=sys.stderr)
    position = 0
    for s in used:
        with np.load(_snapshot_path(workdir, s)) as z:
            for k in range(len(z["sigma_rels"])):
                coefficient = solution.coefficients[position]
                position += 1
                prefix = f"{k}:"
                for key in z.files:
                    if not key.startswith(prefix):
                        continue
                    name, leaf = key[len(prefix) :], z[key]
                    dtypes[name] = leaf.dtype
                    total[name] = total.get(name, 0.0) + coefficient * leaf.astype(np.float64)
        bar.update(1)
    bar.close()
    return {name: value.astype(dtypes[name]) for name, value in total.items()}, solution


def params_like(template, flat: dict[str, np.ndarray]):
    """The pytree `template` (e.g. a loaded run's ema_params) with its leaves taken from `flat`
    ({keystr path: array}, as `reconstruct_posthoc_ema` returns), shapes checked."""

    def take(path, leaf):
        name = jax.tree_util.keystr(path)
        if name not in flat:
            raise KeyError(f"parameter {name} is not in the reconstruction (a snapshot of another model?)")
        value = flat[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"parameter {name}: shape {value.shape} in the reconstruction, {leaf.shape} expected")
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, template)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffjax.training.posthoc_ema",
        description="Reconstruct a power-function EMA of any width from a run's post-hoc EMA snapshots.",
    )
    parser.add_argument("--workdir", required=True, help="the run's work directory (holds posthoc_ema/)")
    parser.add_argument("--sigma_rel", required=True, type=float, help=f"EMA width, in (0, {MAX_SIGMA_REL:.4f})")
    parser.add_argument("--step", type=int, default=None, help="the step to reconstruct (default: newest snapshot)")
    parser.add_argument("--out", required=True, help="output .npz of the parameters (keys: pytree paths)")
    args = parser.parse_args(argv)
    try:
        flat, solution = reconstruct_posthoc_ema(args.workdir, args.sigma_rel, step=args.step)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    atomic_write(args.out, lambda f: np.savez(f, **flat))
    print(
        f"sigma_rel {args.sigma_rel}: {len(solution.coefficients)} snapshot profiles, relative profile "
        f"residual {solution.relative_residual:.3e}; wrote {len(flat)} arrays to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
