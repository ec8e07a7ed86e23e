"""Sampling: `sample(denoiser, key, shape, solver=..., steps=..., grid=...)`. The default solver depends on
the steps (`default_solver`): `GaussianPC()` on its `FlowTime()` grid up to `FEW_STEPS` steps, `UniPC()` on
its `LogSNR()` grid beyond.

Solvers are small typed objects with one step signature (samplers/base.py); options are fields,
validated on construction. Config names (the `SOLVERS` table, for
`validation.build_named(SOLVERS, name, options, "solver")`), method, NFE per step, order:

    ddim              DDIM / first-order exponential integrator (eta > 0: stochastic)     1, 1
    ancestral         DDPM ancestral sampling                                              1, -
    euler, heun       Euler / Heun on the probability-flow ODE in the process's t          1, 1 / 2, 2
    euler_maruyama    Euler-Maruyama on the reverse SDE                                    1, -
    dpm_solver        single-step DPM-Solver-1/2/3 (noise form; data form = DPM-Solver++ 2S/3S)  k, k
    dpm_solver++      multistep DPM-Solver++ 1/2M/3M (data form)                           1, k
    dpm_solver++_sde  SDE-DPM-Solver++(2M)                                                 1, -
    unipc             UniPC-p, bh1/bh2, with the UniC corrector (p by step, bh2: the default)  1, p+1
    deis              rho-AB-DEIS, orders 1-4                                              1, k
    edm_heun          EDM's Heun sampler in the noise level sigma/alpha                     2, 2
    edm_stochastic    EDM's stochastic sampler (S_churn ...)                               2, -
    adaptive          Dormand-Prince 5(4) with rtol/atol error control                     6 per try
    pc                predictor-corrector with Langevin corrector (snr, n_corrector)       n+1, -
    sa_solver         SA-Solver stochastic Adams predictor/corrector (tau)                 1, -
    gaussian_pc       exact for isotropic Gaussian data, variance fitted per sample        1, 2
    learned_variance  ancestral with improved DDPM's learned variance (LearnedVarianceDenoiser)  1, -

Grids (the `GRIDS` table): "uniform" `Uniform()`, "logsnr" `LogSNR()`, "karras" `Karras(rho)`,
"quadratic" `Quadratic()`, "flow_time" `FlowTime(sigma_data)` (uniform in sigma/(sigma + sigma_data
alpha)), "linspace" `Linspace()` (diffusers' default timestep spacing: uniform in t, ending one
spacing above t_min), or an explicit array of times (`Times`), e.g. the one `optimize_grid` returns. Each solver
has a default grid (`Solver.default_grid`): `FlowTime()` for gaussian_pc, `LogSNR()` for the others.
"""

from __future__ import annotations

from diffjax.samplers.adaptive import Adaptive
from diffjax.samplers.base import History, NoState, Phase, Solver
from diffjax.samplers.ddim import DDIM, Ancestral
from diffjax.samplers.deis import DEIS
from diffjax.samplers.dpm_solver import DPMSolver, DPMSolverPP, DPMSolverPPSDE
from diffjax.samplers.euler import Euler, EulerMaruyama
from diffjax.samplers.gaussian_pc import GaussianPC
from diffjax.samplers.grids import GRIDS, FlowTime, Grid, Karras, Linspace, LogSNR, Quadratic, Times, Uniform
from diffjax.samplers.heun import EDMHeun, EDMStochastic, Heun
from diffjax.samplers.langevin import LangevinPC
from diffjax.samplers.learned_variance import LearnedVarianceAncestral, respaced_times
from diffjax.samplers.optimize import optimize_grid
from diffjax.samplers.predictor_corrector import PCStep, PredictorCorrector
from diffjax.samplers.sa_solver import SASolver
from diffjax.samplers.sampling import (
    FEW_STEPS,
    SOLVERS,
    SampleResult,
    check_prediction_is_defined,
    default_solver,
    sample,
)
from diffjax.samplers.unipc import UniPC

__all__ = [
    "sample",
    "SampleResult",
    "optimize_grid",
    "SOLVERS",
    "GRIDS",
    "default_solver",
    "FEW_STEPS",
    "check_prediction_is_defined",
    # the protocol
    "Solver",
    "Phase",
    "NoState",
    "History",
    "PredictorCorrector",
    "PCStep",
    # solvers
    "DDIM",
    "Ancestral",
    "Euler",
    "Heun",
    "EulerMaruyama",
    "DPMSolver",
    "DPMSolverPP",
    "DPMSolverPPSDE",
    "UniPC",
    "DEIS",
    "EDMHeun",
    "EDMStochastic",
    "LearnedVarianceAncestral",
    "respaced_times",
    "Adaptive",
    "LangevinPC",
    "SASolver",
    "GaussianPC",
    # grids
    "Grid",
    "Uniform",
    "LogSNR",
    "Karras",
    "Quadratic",
    "FlowTime",
    "Linspace",
    "Times",
]
