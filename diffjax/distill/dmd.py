"""Distribution matching distillation (DMD; Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", and DMD2, "Improved Distribution Matching Distillation for Fast Image
Synthesis", with their optional regression and GAN terms), and score identity distillation (SiD).

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

Two optional generator terms, off by default:

- Regression (DMD, Sec. 3.3; dropped in DMD2): pairs (z, y) of prior noise and the teacher's
  deterministic ODE sample from it; the generator adds regression_weight * E d(G(z), y), d a
  per-example distance (`L2()`, `PseudoHuber(c)`, DMD's LPIPS or any callable). The pairs come from
  the batch (`PairsFromBatch`: a dataset made once, e.g. by `teacher_ode_pairs`) or are sampled on
  the fly (`PairsFromTeacher`: small problems only).
- GAN (DMD2, Sec. 4.3): a discriminator D(x_t, t) -> logits on diffused samples (DMD2: a head on
  the fake network's bottleneck) with the non-saturating logistic loss: the generator adds
  gan_weight * E softplus(-D(x_t^fake)), the discriminator is trained by discriminator_weight *
  (E softplus(-D(x_t^real)) + E softplus(D(x_t^fake))), x^real the batch's data. stop_gradient
  separates the two as it separates generator and fake denoiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser, EDMPreconditioned, check_prediction
from diffjax.distill.common import (
    L2,
    batch_data,
    check_metric,
    check_name,
    check_teacher,
    network_params,
    resolve_teacher,
)
from diffjax.losses import UniformTime, denoising_loss
from diffjax.processes import GaussianProcess, per_example
from diffjax.samplers.base import Solver
from diffjax.samplers.grids import Grid, Times
from diffjax.samplers.sampling import sample
from diffjax.validation import check_count, check_number

__all__ = [
    "PairsFromBatch",
    "PairsFromTeacher",
    "distribution_matching_gradient",
    "dmd_loss",
    "score_identity_term",
    "sid_loss",
    "teacher_ode_pairs",
]


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


def teacher_ode_pairs(
    teacher: Denoiser,
    key,
    shape,
    *,
    solver: Solver | None = None,
    steps: int = 32,
    grid: Grid | None = None,
    denoise_final: bool = True,
):
    """(z, y) for DMD's regression term: z ~ N(0, sigma(t_max)^2 I), prior noise at the process's
    t_max (what the one-step generator reads), and y the teacher's deterministic ODE sample from z,
    `sample(teacher, key, shape, solver=solver, steps=steps, grid=grid, denoise_final=...)` (z is the
    first state of its trajectory); both behind stop_gradient. solver: a deterministic solver
    (default: `sample`'s for `steps`, `default_solver`); grid: a `Grid` (default: the solver's), not explicit times (the
    noise must start at t_max)."""
    _check_ode_sampling(solver, steps, grid)
    result = sample(
        teacher,
        key,
        shape,
        solver=solver,
        steps=steps,
        grid=grid,
        denoise_final=denoise_final,
        return_trajectory=True,
    )
    return jax.lax.stop_gradient(result.trajectory[0]), jax.lax.stop_gradient(result.samples)


def _check_ode_sampling(solver, steps, grid) -> None:
    if solver is not None and not isinstance(solver, Solver):
        raise TypeError(f"solver must be a diffjax Solver such as UniPC() or Heun(), got {solver!r:.100}")
    if solver is not None and solver.stochastic:
        raise ValueError(f"solver {solver!r:.100} is stochastic; the teacher's ODE sample needs a deterministic one")
    check_count("steps", steps)
    if grid is not None and (not isinstance(grid, Grid) or isinstance(grid, Times)):
        raise TypeError(
            f"grid must be a Grid such as LogSNR() or Karras() (explicit times would not start at the "
            f"process's t_max), got {grid!r:.100}"
        )


@dataclasses.dataclass(frozen=True)
class PairsFromBatch:
    """DMD's regression pairs read from the batch: batch[noise_key] = z, prior noise at the process's
    t_max (the input of `sample`), and batch[sample_key] = y, the teacher's deterministic ODE sample
    from z (a dataset made once, e.g. by `teacher_ode_pairs`); any number of pairs per batch."""

    noise_key: str = "noise"
    sample_key: str = "teacher_sample"

    def __post_init__(self):
        check_name("noise_key", self.noise_key)
        check_name("sample_key", self.sample_key)
        if self.noise_key == self.sample_key:
            raise ValueError(f"noise_key and sample_key must differ, both are {self.noise_key!r}")

    def draw(self, teacher, key, batch, shape):
        """(z, y) from the batch, checked against the generator's sample shape `shape`."""
        missing = [k for k in (self.noise_key, self.sample_key) if not (isinstance(batch, Mapping) and k in batch)]
        if missing:
            entries = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"the regression term reads its pairs from the batch, which has no entries {missing} "
                f"(PairsFromBatch keys; the batch has {entries}); pass a dict batch holding the noise and "
                "the teacher's samples, or regression_pairs=PairsFromTeacher(...) to sample them on the fly"
            )
        z, y = batch[self.noise_key], batch[self.sample_key]
        z_shape, y_shape = getattr(z, "shape", None), getattr(y, "shape", None)
        if z_shape is None or z_shape != y_shape or tuple(z_shape[1:]) != tuple(shape[1:]):
            raise ValueError(
                f"batch[{self.noise_key!r}] and batch[{self.sample_key!r}] must both have shape (pairs, "
                f"*{tuple(shape[1:])}), got {z_shape} and {y_shape}"
            )
        return jax.lax.stop_gradient(jnp.asarray(z)), jax.lax.stop_gradient(jnp.asarray(y))


@dataclasses.dataclass(frozen=True)
class PairsFromTeacher:
    """DMD's regression pairs sampled on the fly at every step by `teacher_ode_pairs` (the teacher's
    ODE, `steps` steps of `solver`): no dataset, but `steps` teacher evaluations per pair per
    training step, so for small problems. batch_size: the number of pairs (default: the generator's
    batch)."""

    solver: Solver | None = None
    steps: int = 32
    grid: Grid | None = None
    denoise_final: bool = True
    batch_size: int | None = None

    def __post_init__(self):
        _check_ode_sampling(self.solver, self.steps, self.grid)
        if self.batch_size is not None:
            check_count("batch_size", self.batch_size)

    def draw(self, teacher, key, batch, shape):
        n = shape[0] if self.batch_size is None else self.batch_size
        return teacher_ode_pairs(
            teacher,
            key,
            (n, *shape[1:]),
            solver=self.solver,
            steps=self.steps,
            grid=self.grid,
            denoise_final=self.denoise_final,
        )


def dmd_loss(
    generator_fn: Callable,
    fake_fn: Callable,
    process: GaussianProcess,
    teacher,
    **options,
):
    """`loss_fn(params, key, batch) -> (loss, aux)`: DMD's generator term plus `fake_weight` times the
    fake denoiser's denoising loss (module docstring), and optionally DMD's regression term and
    DMD2's GAN term.

    generator_fn(params[generator], z, t) is evaluated once at the process's t_max on prior noise and
    read in its `generator_prediction` view as the sample x; fake_fn(params[fake], x, t) is a network
    of view `fake_prediction`; teacher a `Denoiser` on `process` (or `teacher(params) -> Denoiser`).
    Without the GAN term the batch[data_key] gives only the batch size and shape (the generator learns
    from the teacher alone); with it, it is the real data.
    Options (keyword): generator_prediction, fake_prediction ("x0"), time_sampler (UniformTime()),
    t_min, t_max (the range of the matching times; DMD: 0.02 to 0.98 of the range), fake_weight
    (1.0), generator / fake / data_key (the params and batch names), and

    - regression_weight (0: off; DMD: 0.25), regression_pairs (`PairsFromBatch(noise_key,
      sample_key)` or `PairsFromTeacher(solver, steps)`), regression_metric (`L2()`, `PseudoHuber(c)`
      or any `distance(a, b) -> per-example`): + regression_weight * mean d(G(z), y);
    - gan_weight (0: off), discriminator_fn(params[discriminator], x_t, t) -> logits of shape (batch,),
      discriminator_weight (1.0), discriminator (the params name, "discriminator"; name the fake
      network's entry to share its weights, as DMD2's head on its bottleneck does): + gan_weight *
      mean softplus(-D(x_t^fake)) for the generator (D frozen) and discriminator_weight *
      (mean softplus(-D(x_t^real)) + mean softplus(D(x_t^fake))) for D (x^fake frozen), x_t at
      matching times from `time_sampler`.

    aux: "generator_loss", "fake_loss", "gradient_norm" (mean |grad| per example); with the options
    on, "regression_loss", "gan_loss" (the generator's), "discriminator_loss".
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
    regression_weight: float = 0.0,
    regression_pairs: PairsFromBatch | PairsFromTeacher | None = None,
    regression_metric: Callable = L2(),
    gan_weight: float = 0.0,
    discriminator_fn: Callable | None = None,
    discriminator_weight: float = 1.0,
    discriminator: str = "discriminator",
):
    """What DMD and SiD share: a one-step generator x = G(z) at t_max, a fake denoiser trained online
    on stop_gradient(x), and `generator_term(real, fake, x, t, eps) -> (per-example loss, aux)` with
    the fake denoiser's parameters frozen; the optional regression and GAN terms (`dmd_loss`)."""
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
    regression = _check_regression(regression_weight, regression_pairs, regression_metric)
    gan = _check_gan(gan_weight, discriminator_fn, discriminator_weight, discriminator)
    lo, hi = process.resolve_times(t_min, t_max)
    fake_denoising = denoising_loss(
        fake_fn, process, prediction=fake_prediction, time_sampler=time_sampler, t_min=lo, t_max=hi
    )
    start = float(process.t_max)

    def loss_fn(params, key, batch):
        if gan and isinstance(batch, Mapping) and data_key not in batch:
            raise ValueError(
                f"the GAN term (gan_weight={gan_weight!r}) needs real data: the batch has no entry {data_key!r} "
                f"(data_key); its entries: {sorted(batch)}"
            )
        data = batch_data(batch, data_key)
        shape = data.shape
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
        real = resolve_teacher(teacher, params)
        term, aux = generator_term(real, fake_den, x, t, eps)
        generator_loss = jnp.mean(term)
        x_sg = jax.lax.stop_gradient(x)
        fake_loss, _ = fake_denoising(network_params(params, fake, "fake denoiser"), key_fake, x_sg)
        aux = {"generator_loss": generator_loss, "fake_loss": fake_loss, **aux}
        loss = generator_loss + fake_weight * fake_loss
        if regression:  # keys folded in, so the terms above draw what they draw without it
            z_ref, y_ref = regression_pairs.draw(real, jax.random.fold_in(key, 1), batch, shape)
            aux["regression_loss"] = jnp.mean(regression_metric(gen.x0(z_ref, start), y_ref))
            loss = loss + regression_weight * aux["regression_loss"]
        if gan:
            d_params = network_params(params, discriminator, "discriminator")
            gan_loss, disc_loss = _gan_losses(
                discriminator_fn, d_params, process, time_sampler, lo, hi, x, data, jax.random.fold_in(key, 2)
            )
            aux["gan_loss"], aux["discriminator_loss"] = gan_loss, disc_loss
            loss = loss + gan_weight * gan_loss + discriminator_weight * disc_loss
        return loss, aux

    return loss_fn


def _gan_losses(discriminator_fn, d_params, process, time_sampler, lo, hi, x_fake, x_real, key):
    """DMD2's non-saturating logistic GAN on diffused samples: the generator's mean softplus(-D(x_t^fake))
    with D's parameters frozen, and the discriminator's mean softplus(-D(x_t^real)) + mean
    softplus(D(x_t^fake)) with x^fake frozen."""
    key_tf, key_ef, key_tr, key_er = jax.random.split(key, 4)
    t_fake, _ = time_sampler(process, key_tf, x_fake.shape[0], lo, hi)
    t_real, _ = time_sampler(process, key_tr, x_real.shape[0], lo, hi)
    xt_fake = process.perturb(x_fake, t_fake, jax.random.normal(key_ef, x_fake.shape, x_fake.dtype))
    xt_real = process.perturb(x_real, t_real, jax.random.normal(key_er, x_real.shape, x_real.dtype))

    def logits(p, x_t, t):
        out = discriminator_fn(p, x_t, t)
        if getattr(out, "shape", None) != (x_t.shape[0],):
            raise ValueError(
                f"discriminator_fn must return one logit per example, shape ({x_t.shape[0]},), "
                f"got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out

    gan_loss = jnp.mean(jax.nn.softplus(-logits(jax.lax.stop_gradient(d_params), xt_fake, t_fake)))
    disc_loss = jnp.mean(jax.nn.softplus(-logits(d_params, xt_real, t_real))) + jnp.mean(
        jax.nn.softplus(logits(d_params, jax.lax.stop_gradient(xt_fake), t_fake))
    )
    return gan_loss, disc_loss


def _check_weight(name: str, value) -> float:
    value = check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 turns the term off), got {value!r}")
    return value


def _check_regression(weight, pairs, metric) -> bool:
    """Whether the regression term is on (weight > 0); its options checked."""
    if _check_weight("regression_weight", weight) == 0:
        return False
    if not isinstance(pairs, (PairsFromBatch, PairsFromTeacher)):
        raise ValueError(
            f"regression_weight={weight!r} needs regression_pairs: PairsFromBatch(noise_key, sample_key) (a "
            f"dataset of noise and teacher samples in the batch) or PairsFromTeacher(solver, steps) (sampled "
            f"on the fly), got {pairs!r:.100}"
        )
    check_metric(metric)
    return True


def _check_gan(weight, discriminator_fn, discriminator_weight, discriminator) -> bool:
    """Whether the GAN term is on (gan_weight > 0); its options checked."""
    _check_weight("discriminator_weight", discriminator_weight)
    check_name("discriminator", discriminator)
    if _check_weight("gan_weight", weight) == 0:
        return False
    if not callable(discriminator_fn):
        raise ValueError(
            f"gan_weight={weight!r} needs discriminator_fn(params[discriminator], x_t, t) -> logits, got "
            f"{discriminator_fn!r:.100}"
        )
    return True
