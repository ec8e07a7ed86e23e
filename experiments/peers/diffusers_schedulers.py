"""diffusers' schedulers (diffusers 0.42.1, CPU torch) driven by an EXACT denoiser given by the caller.

    from experiments.peers.diffusers_schedulers import SETTING_NAMES, run_setting, our_process

    result = run_setting("dpm++2m_karras", x0_fn, noise, nfe=10)   # betas: default DDPM linear chain
    result.samples      # (batch, ...) float64, diffusers' final samples
    result.nfe          # network calls, counted (== nfe; Heun: see below)
    result.alphas, result.sigmas            # (nfe,) the (alpha, sigma) of each call, VP convention
    result.grid_alphas, result.grid_sigmas  # the scheduler's nodes, its last one included

`x0_fn(x_t, alpha, sigma) -> x0` is the denoiser in the VP convention x_t = alpha x0 + sigma eps: x_t
an (batch, ...) float64 array, alpha and sigma floats, EXACTLY those the scheduler assumes at that
call (from `scheduler.sigmas`, not a rounded timestep; DDIM: from `alphas_cumprod` at its timestep).
The schedulers are configured with `prediction_type="sample"`, so x0_fn's output is used as given.
Euler and Heun keep their state in the variance-exploding scale x/alpha; the driver hands x0_fn the
VP state `scheduler.scale_model_input(x)` = alpha * (x/alpha) instead.

`noise` is standard-normal; the driver multiplies it by the scheduler's `init_noise_sigma`, so the
VP start is `result.initial_std * noise` (1 for DPM-Solver++, UniPC, DEIS and DDIM, where diffusers
starts at N(0, I); sigma_vp(s_max) = s_max/sqrt(1 + s_max^2) for Euler and Heun on their default
spacing). To start from a given VP state x_T, pass noise = x_T / `initial_std(name, nfe, betas)`.

NFE: `num_inference_steps = nfe` for every setting but Heun, where `steps_for_nfe` gives
(nfe + 1) // 2 steps: Heun evaluates twice per step except the last one into sigma = 0 (an Euler
step), so it makes 2 * steps - 1 calls: nfe for odd nfe, nfe - 1 for even nfe (`result.nfe` is the
count). Every setting but "deis", "deis3" and "unipc_bh1" ends with a step into sigma = 0, i.e.
returns the x0 prediction at the last node; those three end at the first training step, sigma_min
(diffusers' UniPC bh1 returns NaN when it ends at sigma = 0, its default; with Karras sigmas it has
no finite end, so there is no "unipc_bh1_karras").

`betas`: the DDPM chain (default: the linear 1000-step chain 1e-4 .. 0.02, diffusers' default),
given to diffusers as `trained_betas` (which it stores in float32) and to `our_process` after
rounding to float32 too, so both libraries describe the same chain. `our_times` maps the nodes'
alphas onto that process's time axis.

Precision: samples, model outputs and the schedulers' sigmas (alphas_cumprod for DDIM) are float64
tensors during the run; the sigma grids themselves are the float32 values diffusers computes, and
DPMSolverMultistepScheduler and EulerDiscreteScheduler round the state to float32 inside `step()`
(their own "upcast"), so their results carry float32 rounding of the state per step.

DDIM "trailing": diffusers steps from timestep t to t - 1000 // steps, which is the next timestep
only when steps divides 1000; otherwise its state and its next evaluation disagree by a timestep
(the driver still reproduces diffusers exactly, but no grid of ours can).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffjax.processes import DiscreteVP
from diffjax.validation import check_choice, check_count

__all__ = [
    "SETTINGS",
    "SETTING_NAMES",
    "Setting",
    "PeerResult",
    "run_setting",
    "steps_for_nfe",
    "initial_std",
    "default_betas",
    "our_process",
    "our_times",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One diffusers configuration: the scheduler class name, its options (besides the chain and
    prediction_type="sample"), and how its calls are placed ("sigma": at scheduler.sigmas[i];
    "ddim": at alphas_cumprod[timestep]; "heun": sigmas with the corrector's repeats)."""

    scheduler: str
    options: tuple[tuple[str, object], ...]
    placement: str = "sigma"
    ve_state: bool = False  # Euler, Heun: the state is x/alpha (variance-exploding scale)


def _dpm(order: int, **spacing) -> Setting:
    return Setting(
        "DPMSolverMultistepScheduler",
        (("solver_order", order), ("algorithm_type", "dpmsolver++"), *spacing.items()),
    )


def _unipc(variant: str, **spacing) -> Setting:
    return Setting("UniPCMultistepScheduler", (("solver_order", 2), ("solver_type", variant), *spacing.items()))


SETTINGS: dict[str, Setting] = {
    "dpm++2m": _dpm(2),
    "dpm++2m_karras": _dpm(2, use_karras_sigmas=True),
    "dpm++2m_lu": _dpm(2, use_lu_lambdas=True),
    "dpm++3m": _dpm(3),
    "dpm++3m_karras": _dpm(3, use_karras_sigmas=True),
    "dpm++3m_lu": _dpm(3, use_lu_lambdas=True),
    # bh1 with diffusers' default final_sigmas_type="zero" returns NaN (its last, order-1 step
    # multiplies B(h) = -h = -inf by a zero residual), so bh1 runs end at sigma_min instead.
    "unipc_bh1": _unipc("bh1", final_sigmas_type="sigma_min"),
    "unipc_bh2": _unipc("bh2"),
    "unipc_bh2_karras": _unipc("bh2", use_karras_sigmas=True),
    "unipc3_bh2": Setting("UniPCMultistepScheduler", (("solver_order", 3), ("solver_type", "bh2"))),
    "deis": Setting("DEISMultistepScheduler", (("solver_order", 2),)),
    "deis3": Setting("DEISMultistepScheduler", (("solver_order", 3),)),
    "ddim_trailing": Setting(
        "DDIMScheduler", (("timestep_spacing", "trailing"), ("clip_sample", False), ("set_alpha_to_one", True)), "ddim"
    ),
    "euler": Setting("EulerDiscreteScheduler", (), ve_state=True),
    "euler_karras": Setting("EulerDiscreteScheduler", (("use_karras_sigmas", True),), ve_state=True),
    "heun": Setting("HeunDiscreteScheduler", (), "heun", ve_state=True),
    "heun_karras": Setting("HeunDiscreteScheduler", (("use_karras_sigmas", True),), "heun", ve_state=True),
}
SETTING_NAMES: tuple[str, ...] = tuple(SETTINGS)


@dataclasses.dataclass(frozen=True)
class PeerResult:
    """diffusers' final samples, its network calls and where it made them (module docstring)."""

    samples: np.ndarray
    nfe: int
    alphas: np.ndarray
    sigmas: np.ndarray
    grid_alphas: np.ndarray
    grid_sigmas: np.ndarray
    initial_std: float
    num_inference_steps: int


def default_betas() -> np.ndarray:
    """diffusers' default chain: 1000 linear betas from 1e-4 to 0.02 (float64 values of float32)."""
    return np.linspace(1e-4, 0.02, 1000, dtype=np.float32).astype(np.float64)


def _chain(betas) -> np.ndarray:
    betas = default_betas() if betas is None else np.asarray(betas, np.float64)
    return betas.astype(np.float32).astype(np.float64)


def our_process(betas=None) -> DiscreteVP:
    """diffjax's process for the same chain (knot i at t = i / len(betas); t_min = 1 / len(betas),
    diffusers' timestep 0)."""
    return DiscreteVP.from_betas(_chain(betas))


def our_times(process: DiscreteVP, alphas) -> np.ndarray:
    """The times (float64) at which `process` has the given alphas (0 < alpha < 1): the inverse of
    its piecewise-linear log(alpha_bar), computed in float64 from its stored knots."""
    log_alpha_bar = np.asarray(process.log_alpha_bar, np.float64)
    knots = np.linspace(0.0, 1.0, log_alpha_bar.size)
    return np.interp(2.0 * np.log(np.asarray(alphas, np.float64)), log_alpha_bar[::-1], knots[::-1])


def steps_for_nfe(name: str, nfe: int) -> int:
    """num_inference_steps for `nfe` network calls (Heun: (nfe + 1) // 2, making 2 steps - 1 calls)."""
    check_choice("setting", name, SETTING_NAMES)
    nfe = check_count("nfe", nfe)
    if SETTINGS[name].placement == "heun":
        return (nfe + 1) // 2
    return nfe


def _scheduler(name: str, betas: np.ndarray, steps: int):
    import diffusers  # the peers extra; imported here so that the module's names load without it
    import torch

    setting = SETTINGS[name]
    cls = getattr(diffusers, setting.scheduler)
    scheduler = cls(
        num_train_timesteps=betas.size,
        trained_betas=betas.tolist(),
        prediction_type="sample",
        **dict(setting.options),
    )
    scheduler.set_timesteps(steps)
    # float64 arithmetic on the float32 grid diffusers computed
    scheduler.sigmas = scheduler.sigmas.to(torch.float64) if hasattr(scheduler, "sigmas") else None
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(torch.float64)
    return scheduler


def _alpha_sigma_from_ve(s):
    s = np.asarray(s, np.float64)
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    return alpha, s * alpha


def _nodes(setting: Setting, scheduler) -> tuple[np.ndarray, np.ndarray]:
    """The scheduler's grid as (alphas, sigmas), last node included (sigma = 0: alpha = 1)."""
    if setting.placement == "ddim":
        ac = scheduler.alphas_cumprod.numpy()[scheduler.timesteps.numpy()]
        ac = np.concatenate([ac, [float(scheduler.final_alpha_cumprod)]])
        return np.sqrt(ac), np.sqrt(1.0 - ac)
    s = scheduler.sigmas.numpy()
    if setting.placement == "heun":  # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]
        s = np.concatenate([s[:1], s[1::2]])
    return _alpha_sigma_from_ve(s)


def _call_point(setting: Setting, scheduler, index: int, timestep) -> tuple[float, float]:
    if setting.placement == "ddim":
        ac = float(scheduler.alphas_cumprod[int(timestep)])
        return float(np.sqrt(ac)), float(np.sqrt(1.0 - ac))
    alpha, sigma = _alpha_sigma_from_ve(float(scheduler.sigmas[index]))
    return float(alpha), float(sigma)


def initial_std(name: str, nfe: int, betas=None) -> float:
    """The std of the VP state the run starts from per unit of `noise` (module docstring)."""
    scheduler = _scheduler(name, _chain(betas), steps_for_nfe(name, nfe))
    return _initial_std(SETTINGS[name], scheduler)


def _initial_std(setting: Setting, scheduler) -> float:
    scale = float(scheduler.init_noise_sigma)
    if setting.ve_state:  # x_vp = alpha(s0) * x_ve at the first node
        return scale / float(np.sqrt(1.0 + float(scheduler.sigmas[0]) ** 2))
    return scale


def run_setting(name: str, x0_fn, noise: np.ndarray, nfe: int, betas: np.ndarray | None = None) -> PeerResult:
    """Run diffusers' setting `name` (one of SETTING_NAMES) with the exact denoiser `x0_fn` from
    `noise` for about `nfe` network calls (module docstring)."""
    import torch

    check_choice("setting", name, SETTING_NAMES)
    setting = SETTINGS[name]
    steps = steps_for_nfe(name, nfe)
    scheduler = _scheduler(name, _chain(betas), steps)
    noise = np.asarray(noise, np.float64)
    sample = torch.from_numpy(noise) * float(scheduler.init_noise_sigma)
    alphas, sigmas = [], []
    for index, timestep in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(sample, timestep)
        alpha, sigma = _call_point(setting, scheduler, index, timestep)
        x0 = np.asarray(x0_fn(x_in.numpy().astype(np.float64), alpha, sigma), np.float64)
        if x0.shape != noise.shape:
            raise ValueError(f"x0_fn returned shape {x0.shape}; it must return the input's shape {noise.shape}")
        sample = scheduler.step(torch.from_numpy(x0), timestep, sample).prev_sample.to(torch.float64)
        position = getattr(scheduler, "step_index", None)
        if position is not None and position != index + 1:
            raise RuntimeError(f"{name}: scheduler step index {position} after call {index}; expected {index + 1}")
        alphas.append(alpha)
        sigmas.append(sigma)
    grid_alphas, grid_sigmas = _nodes(setting, scheduler)
    return PeerResult(
        samples=sample.numpy(),
        nfe=len(alphas),
        alphas=np.asarray(alphas),
        sigmas=np.asarray(sigmas),
        grid_alphas=grid_alphas,
        grid_sigmas=grid_sigmas,
        initial_std=_initial_std(setting, scheduler),
        num_inference_steps=steps,
    )
