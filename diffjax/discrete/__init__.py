"""diffjax.discrete: discrete-state diffusion in the same shape as the Gaussian core.

processes    MaskedProcess (schedules LinearSchedule, CosineSchedule, PolynomialSchedule,
             LearnedPolynomial), UniformProcess, D3PM (uniform, absorbing, gaussian, band);
             marginal / transition / rate matrices, Bayes posteriors; build_discrete_process
denoisers    CategoricalDenoiser (logits over x0 -> posterior, rates; RADD time_free),
             discrete_guidance (classifier-free guidance on x0 logits)
losses       masked_diffusion_loss (continuous-time ELBO), d3pm_hybrid_loss, step_kl,
             DiscreteTimes (uniform / antithetic / stratified), make_discrete_loss_fn
samplers     sample_tokens with DiscreteAncestral, TauLeaping, FirstHitting, ConfidenceUnmasking,
             BlockDiffusion (block-autoregressive); cache=True (RADD) counts the network evaluations saved
likelihood   masked_elbo_nats, discrete_elbo_nats, bits_per_token
toy          EnumerableSequences: distributions over short sequences with exact denoisers
"""

from diffjax.discrete.denoisers import CategoricalDenoiser, discrete_guidance, support_log_mask
from diffjax.discrete.likelihood import bits_per_token, discrete_elbo_nats, masked_elbo_nats, prior_kl
from diffjax.discrete.losses import (
    DISCRETE_LOSSES,
    DiscreteTimes,
    d3pm_hybrid_loss,
    make_discrete_loss_fn,
    masked_diffusion_loss,
    masked_elbo_integrand,
    step_kl,
)
from diffjax.discrete.processes import (
    D3PM,
    D3PM_TRANSITIONS,
    DISCRETE_PROCESSES,
    MASKING_SCHEDULES,
    CosineSchedule,
    DiscreteProcess,
    LearnedPolynomial,
    LinearSchedule,
    MaskedProcess,
    PolynomialSchedule,
    UniformProcess,
    build_discrete_process,
    check_tokens,
)
from diffjax.discrete.samplers import (
    DISCRETE_SAMPLERS,
    BlockDiffusion,
    ConfidenceUnmasking,
    DiscreteAncestral,
    FirstHitting,
    TauLeaping,
    TokenSamples,
    build_discrete_sampler,
    sample_tokens,
)
from diffjax.discrete.toy import EnumerableSequences

__all__ = [
    "BlockDiffusion",
    "D3PM",
    "D3PM_TRANSITIONS",
    "DISCRETE_LOSSES",
    "DISCRETE_PROCESSES",
    "DISCRETE_SAMPLERS",
    "MASKING_SCHEDULES",
    "CategoricalDenoiser",
    "ConfidenceUnmasking",
    "CosineSchedule",
    "DiscreteAncestral",
    "DiscreteProcess",
    "DiscreteTimes",
    "EnumerableSequences",
    "FirstHitting",
    "LearnedPolynomial",
    "LinearSchedule",
    "MaskedProcess",
    "PolynomialSchedule",
    "TauLeaping",
    "TokenSamples",
    "UniformProcess",
    "bits_per_token",
    "build_discrete_process",
    "build_discrete_sampler",
    "check_tokens",
    "d3pm_hybrid_loss",
    "discrete_elbo_nats",
    "discrete_guidance",
    "make_discrete_loss_fn",
    "masked_diffusion_loss",
    "masked_elbo_integrand",
    "masked_elbo_nats",
    "prior_kl",
    "sample_tokens",
    "step_kl",
    "support_log_mask",
]
