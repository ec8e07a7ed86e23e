"""Distribution matching distillation (DMD; Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", and DMD2, "Improved Distribution Matching Distillation for Fast Image
Synthesis", without the optional regression and GAN terms), and score identity distillation (SiD).

A one-step generator x = G_theta(z), z ~ N(0, sigma(t_max)^2 I), is trained to minimise
KL(p_fake || p_real) of the diffused distributions. Its gradient with respect to a sample is the
difference of the two scores at x_t = alpha_t x + sigma_t eps, written with the two x0-denoisers
(score = (alpha D - x_t) / sigma^2):

    grad_x KL = E_t,eps [ w(x) (D_fake(x_t, t) - D_real(x_t, t)) ],   w(x) = 1 / mean_dims |x - D_real(x_t, t)|

(DMD's weighting, eq. 8), applied through the surrogate 1/2 ||x - stop_gradient(x - grad)||^2. D_real
is the teacher; D_fake is a second network trained online by the ordinary denoising loss on the
generator's (stop-gradient) samples, so it tracks p_fake. Both terms go into one loss over
{"generator": ..., "fake": ...}; the gradients are separated by stop_gradient, so one
`make_train_step` updates both at once (DMD2's larger fake-score learning rate: optax.multi_transform).

Score identity distillation (SiD; Zhou et al. 2024, "Score identity Distillation: Exponentially Fast
Distillation of Pretrained Diffusion Models for One-Step Generation") trains the same pair with
another generator term, differentiated through x and x_t = alpha_t x + sigma_t eps (the networks'
weights frozen, their inputs not):

    (D_real - D_fake) . ((D_real - x) - alpha (D_real - D_fake)) / stop_gradient(mean_dims |x - D_real|)

Its first part estimates the Fisher divergence E ||D_real - D_fake||^2 by the score identity
E[D_fake(x_t) - x | x_t] = 0; alpha weighs the second (alpha = 1.2 in the paper).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser, EDMPreconditioned, check_prediction
from diffjax.distill.common import batch_data, check_name, check_teacher, network_params, resolve_teacher
from diffjax.losses import UniformTime, denoising_loss
from diffjax.processes import GaussianProcess, per_example
from diffjax.validation import check_number

__all__ = ["distribution_matching_gradient", "dmd_loss", "score_identity_term", "sid_loss"]


def distribution_matching_gradient(real: Denoiser, fake: Denoiser, x, t, eps):
    """DMD's per-sample gradient w(x) (D_fake - D_real)(x_t, t) at x_t = alpha_t x + sigma_t eps (module
    docstring); zero where the two denoisers agree."""
    x_t = real.process.perturb(x, t, eps)
    d_real, d_fake = real.x0(x_t, t), fake.x0(x_t, t)
    weight = 1.0 / jnp.maximum(per_example(jnp.mean, jnp.abs(x - d_real), keepdims=True), 1e-8)
    return weight * (d_fake - d_real)


def score_identity_term(d_real, d_fake, x, alpha: float):
    """SiD's per-example generator term mean_dims[(D_real - D_fake) ((D_real - x) - alpha (D_real - D_fake))]
    (module docstring). With the exact fake denoiser, E[D_fake - x | x_t] = 0 (Tweedie), so its
    expectation is (1 - alpha) E mean_dims (D_real - D_fake)^2."""
    diff = d_real - d_fake
    return per_example(jnp.mean, diff * ((d_real - x) - alpha * diff))


def dmd_loss(
    generator_fn: Callable,
    fake_fn: Callable,
    process: GaussianProcess,
    teacher,
    **options,
):
    """`loss_fn(params, key, batch) -> (loss, aux)`: DMD's generator term plus `fake_weight` times the
    fake denoiser's denoising loss (module docstring).

    generator_fn(params[generator], z, t) is evaluated once at the process's t_max on prior noise and
    read in its `generator_prediction` view as the sample x; fake_fn(params[fake], x, t) is a network
    of view `fake_prediction`; teacher a `Denoiser` on `process` (or `teacher(params) -> Denoiser`).
    The batch gives only the batch size and shape (the generator learns from the teacher alone).
    Options (keyword): generator_prediction, fake_prediction ("x0"), time_sampler (UniformTime()),
    t_min, t_max (the range of the matching times; DMD: 0.02 to 0.98 of the range), fake_weight
    (1.0), generator / fake / data_key (the params and batch names).
    aux: "generator_loss", "fake_loss", "gradient_norm" (mean |grad| per example).
    """

    def generator_term(real, fake, x, t, eps):
        x_sg = jax.lax.stop_gradient(x)
        grad = jax.lax.stop_gradient(distribution_matching_gradient(real, fake, x_sg, t, eps))
        loss = 0.5 * per_example(jnp.mean, (x - (x_sg - grad)) ** 2)
        return loss, {"gradient_norm": jnp.mean(jnp.sqrt(per_example(jnp.sum, grad**2)))}

    return _fake_score_loss(generator_fn, fake_fn, process, teacher, generator_term, **options)


def sid_loss(
    generator_fn: Callable,
    fake_fn: Callable,
    process: GaussianProcess,
    teacher,
    *,
    alpha: float = 1.2,
    **options,
):
    """`loss_fn(params, key, batch) -> (loss, aux)`: score identity distillation (SiD; Zhou et al.
    2024): the generator term `score_identity_term(D_real, D_fake, x, alpha)` at x_t = alpha_t x +
    sigma_t eps, differentiated through x and x_t (both networks frozen there), divided by
    stop_gradient(max(mean_dims |x - D_real|, 1e-5)), plus `fake_weight` times the fake denoiser's
    denoising loss. alpha: SiD's alpha (1.2 in the paper). Arguments and options as in `dmd_loss`.
    aux: "generator_loss", "fake_loss", "score_difference" (mean squared D_real - D_fake).
    """
    alpha = check_number("alpha", alpha)

    def generator_term(real, fake, x, t, eps):
        x_t = real.process.perturb(x, t, eps)
        d_real, d_fake = real.x0(x_t, t), fake.x0(x_t, t)
        scale = jax.lax.stop_gradient(jnp.maximum(per_example(jnp.mean, jnp.abs(x - d_real)), 1e-5))
        loss = score_identity_term(d_real, d_fake, x, alpha) / scale
        return loss, {"score_difference": jnp.mean((d_real - d_fake) ** 2)}

    return _fake_score_loss(generator_fn, fake_fn, process, teacher, generator_term, **options)


def _fake_score_loss(
    generator_fn: Callable,
    fake_fn: Callable,
    process: GaussianProcess,
    teacher,
    generator_term: Callable,
    *,
    generator_prediction: str | EDMPreconditioned = "x0",
    fake_prediction: str | EDMPreconditioned = "x0",
    time_sampler=UniformTime(),
    t_min: float | None = None,
    t_max: float | None = None,
    fake_weight: float = 1.0,
    generator: str = "generator",
    fake: str = "fake",
    data_key: str = "image",
):
    """What DMD and SiD share: a one-step generator x = G(z) at t_max, a fake denoiser trained online
    on stop_gradient(x), and `generator_term(real, fake, x, t, eps) -> (per-example loss, aux)` with
    the fake denoiser's parameters frozen."""
    for name, fn in (("generator_fn", generator_fn), ("fake_fn", fake_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    check_teacher(teacher, process)
    for prediction in (generator_prediction, fake_prediction):
        if not isinstance(prediction, EDMPreconditioned):
            check_prediction(prediction)
    check_number("fake_weight", fake_weight)
    for name, value in (("generator", generator), ("fake", fake), ("data_key", data_key)):
        check_name(name, value)
    lo, hi = process.resolve_times(t_min, t_max)
    fake_denoising = denoising_loss(
        fake_fn, process, prediction=fake_prediction, time_sampler=time_sampler, t_min=lo, t_max=hi
    )
    start = float(process.t_max)

    def loss_fn(params, key, batch):
        shape = batch_data(batch, data_key).shape
        key_z, key_t, key_eps, key_fake = jax.random.split(key, 4)
        z = process.prior_sample(key_z, shape)
        gen = Denoiser(
            lambda x, s: generator_fn(network_params(params, generator, "generator"), x, s),
            process,
            generator_prediction,
        )
        x = gen.x0(z, start)
        t, _ = time_sampler(process, key_t, shape[0], lo, hi)
        eps = jax.random.normal(key_eps, shape, x.dtype)
        fake_params = jax.lax.stop_gradient(network_params(params, fake, "fake denoiser"))
        fake_den = Denoiser(lambda u, s: fake_fn(fake_params, u, s), process, fake_prediction)
        term, aux = generator_term(resolve_teacher(teacher, params), fake_den, x, t, eps)
        generator_loss = jnp.mean(term)
        x_sg = jax.lax.stop_gradient(x)
        fake_loss, _ = fake_denoising(network_params(params, fake, "fake denoiser"), key_fake, x_sg)
        aux = {"generator_loss": generator_loss, "fake_loss": fake_loss, **aux}
        return generator_loss + fake_weight * fake_loss, aux

    return loss_fn
