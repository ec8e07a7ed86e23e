"""Equality with MD4 (google-deepmind/md4, Shi et al. 2024): its masking schedules, ELBO losses and
ancestral sampling step against ours on the same fixed inputs.

    PYTHONPATH=<md4's dependencies> python -m experiments.peers.make_md4_fixtures --md4 /path/to/md4-checkout

The checkout is the repository's root (the folder holding `md4/`); its package is loaded from that
path (nothing is added to sys.path), and its own dependencies (flax.linen, tensorflow_probability's
JAX substrate, distrax, clu, matplotlib, seaborn, imported by md4/utils.py) must be importable.
(tensorflow-probability 0.25's JAX backend does not import on the JAX installed here, 0.10.2: its
backend/jax/ops.py registers a class with `jax.interpreters.xla.pytype_aval_mappings`, which JAX
removed; wrapping those registrations in try/except in the local copy of tensorflow-probability lets
it import, and md4's code then runs unchanged.)

The network is replaced by fixed logits: a subclass of MD4's modules whose `predict_x` returns
`LOGIT_SCALE * normal(PRNGKey(LOGITS_SEED))` and records (flax `sow`) the z_t and t it was given.
MD4's schedules are built with eps = 0 (its default 1e-4 shrinks alpha into [eps, 1 - eps]; ours
runs from 1 to 0). It writes

    tests/fixtures/md4/md4_reference.npz    MD4's numbers (below) and the inputs they were made from
    experiments/results/md4_equality.{json,md}   the max relative error of ours per quantity

Quantities, for each schedule of SCHEDULES (MD4's MaskingSchedule name -> ours):
    <s>_alpha, <s>_dalpha         alpha(t), alpha'(t) on the grid TIMES
    <s>_weight                    MD4's dgamma_times_alpha = alpha' / (1 - alpha) = -our unmasking_rate
    <s>_loss_cont                 MD4.diffusion_loss (cont_time) per example = our masked_elbo_integrand
                                  at MD4's own draw of z_t (stored)
    <s>_loss_T20                  MD4.diffusion_loss with timesteps=20 = 20 * our step_kl(x0, z_t, t - 1/20, t)
    <s>_step_<grid>               MD4.ancestral_sample_step's tokens (sampling_grid "uniform" / "cosine")
                                  = our DiscreteAncestral().step with MD4's key fold_in(rng, i)
plus GenMD4 (learnable state-dependent polynomial, w random): genmd4_alpha / _dalpha / _weight
(t, vocab) and genmd4_loss (its diffusion_loss), and MD4.__call__ (antithetic time sampling):
call_times = our stratified DiscreteTimes from MD4's first time, call_loss = its mean loss in bits per
token.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.losses import DiscreteTimes, masked_elbo_integrand, step_kl
from diffjax.discrete.processes import (
    CosineSchedule,
    LearnedPolynomial,
    LinearSchedule,
    MaskedProcess,
    PolynomialSchedule,
)
from diffjax.discrete.samplers import DiscreteAncestral
from diffjax.io import atomic_write
from experiments.benchmarks.common import markdown_table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "md4", "md4_reference.npz")
VOCAB, LENGTH, BATCH = 7, 16, 8
LOGITS_SEED, LOGIT_SCALE = 0, 2.0
DISCRETE_STEPS = 20
TIMES = np.linspace(0.02, 0.98, 25, dtype=np.float32)
# MD4's schedule name -> ours
SCHEDULES = {
    "linear": LinearSchedule(),
    "cosine": CosineSchedule(),
    "poly3": PolynomialSchedule(3.0),
    "poly0.5": PolynomialSchedule(0.5),
}
STEP_GRIDS = ("uniform", "cosine")
STEP_INDEX, STEP_COUNT = 1, 4  # MD4's step i of timesteps: t = 0.75, s = 0.5 on the uniform grid


def fixed_logits(shape):
    """The network output every model here returns: (..., VOCAB)."""
    return LOGIT_SCALE * jax.random.normal(jax.random.PRNGKey(LOGITS_SEED), tuple(shape) + (VOCAB,))


# ------------------------------------------------------------------------------------------------
# MD4's side (needs its checkout)
# ------------------------------------------------------------------------------------------------


def load_md4(checkout: str):
    """MD4's `md4.models.diffusion.{md4, genmd4}` modules, the package loaded from checkout/md4."""
    package_dir = os.path.join(os.path.abspath(checkout), "md4")
    spec = importlib.util.spec_from_file_location(
        "md4", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    if spec is None or not os.path.isdir(package_dir):
        raise FileNotFoundError(f"no md4 package under {checkout!r}: pass the repository root holding md4/")
    sys.modules["md4"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["md4"])
    return (
        importlib.import_module("md4.models.diffusion.md4"),
        importlib.import_module("md4.models.diffusion.genmd4"),
    )


def probe_classes(md4_module, genmd4_module):
    """MD4 / GenMD4 with the fixed-logits network and (MD4) an eps = 0 schedule."""

    def predict_x(self, zt, t, cond=None, train=False):
        self.sow("intermediates", "zt", zt)
        self.sow("intermediates", "t", t)
        return fixed_logits(zt.shape), None

    class ProbeMD4(md4_module.MD4):
        def setup(self):
            self.noise_schedule = md4_module.MaskingSchedule(self.data_shape, self.noise_schedule_type, eps=0.0)

    class ProbeGenMD4(genmd4_module.GenMD4):
        pass

    ProbeMD4.predict_x = predict_x
    ProbeGenMD4.predict_x = predict_x
    return ProbeMD4, ProbeGenMD4


def make_reference(checkout: str) -> dict[str, np.ndarray]:
    md4_module, genmd4_module = load_md4(checkout)
    ProbeMD4, ProbeGenMD4 = probe_classes(md4_module, genmd4_module)
    shape = (LENGTH,)
    keys = iter(jax.random.split(jax.random.PRNGKey(2024), 64))
    x0 = jax.random.randint(next(keys), (BATCH, LENGTH), 0, VOCAB)
    t_batch = jnp.linspace(0.05, 0.95, BATCH)
    z_partial = jnp.where(jax.random.uniform(next(keys), (BATCH, LENGTH)) < 0.5, x0, VOCAB)
    out = {
        "x0": x0,
        "t_batch": t_batch,
        "times": TIMES,
        "logits": fixed_logits((BATCH, LENGTH)),
        "z_partial": z_partial,
    }

    for name in SCHEDULES:
        schedule = md4_module.MaskingSchedule(shape, name, eps=0.0)
        for quantity, method in (("alpha", "alpha"), ("dalpha", "dalpha"), ("weight", "dgamma_times_alpha")):
            out[f"{name}_{quantity}"] = schedule.apply({}, jnp.asarray(TIMES), method=method)
        cont = ProbeMD4(shape, vocab_size=VOCAB, classes=0, cont_time=True, noise_schedule_type=name)
        loss, seen = cont.apply(
            {}, t_batch, x0, method=cont.diffusion_loss, rngs={"sample": next(keys)}, mutable=["intermediates"]
        )
        out[f"{name}_loss_cont"], out[f"{name}_zt_cont"] = loss, seen["intermediates"]["zt"][0]
        disc = ProbeMD4(
            shape, vocab_size=VOCAB, classes=0, cont_time=False, timesteps=DISCRETE_STEPS, noise_schedule_type=name
        )
        loss, seen = disc.apply(
            {}, t_batch, x0, method=disc.diffusion_loss, rngs={"sample": next(keys)}, mutable=["intermediates"]
        )
        out[f"{name}_loss_T{DISCRETE_STEPS}"] = loss
        out[f"{name}_zt_T{DISCRETE_STEPS}"] = seen["intermediates"]["zt"][0]
        out[f"{name}_t_T{DISCRETE_STEPS}"] = seen["intermediates"]["t"][0]
        for grid in STEP_GRIDS:
            model = ProbeMD4(shape, vocab_size=VOCAB, classes=0, noise_schedule_type=name, sampling_grid=grid)
            rng = next(keys)
            zs = model.apply({}, rng, STEP_INDEX, STEP_COUNT, z_partial, method=model.ancestral_sample_step)
            s, t = model.apply({}, STEP_INDEX, STEP_COUNT, method=model.get_sampling_grid)
            out[f"{name}_step_{grid}"] = zs
            out[f"{name}_step_{grid}_key"] = jax.random.fold_in(rng, STEP_INDEX)  # MD4's rng_body
            out[f"{name}_step_{grid}_st"] = jnp.stack([s, t])

    # GenMD4: the learnable state-dependent polynomial schedule, w random (power = softplus(w))
    w = 0.7 * jax.random.normal(next(keys), (VOCAB,))
    vec = genmd4_module.LearnableVecMaskingSchedule(shape, "poly", vocab_size=VOCAB, eps=0.0)
    params = {"params": {"w": w}}
    out["genmd4_power"] = vec.apply(params, method=lambda m: m.power)
    for quantity, method in (("alpha", "alpha"), ("dalpha", "dalpha"), ("weight", "dgamma_times_alpha")):
        out[f"genmd4_{quantity}"] = vec.apply(params, jnp.asarray(TIMES), method=method)
    gen = ProbeGenMD4(shape, vocab_size=VOCAB, classes=0, cont_time=True)
    (loss, zt), _ = gen.apply(
        {"params": {"noise_schedule": {"w": w}}},
        t_batch,
        x0,
        method=gen.diffusion_loss,
        rngs={"sample": next(keys)},
        mutable=["intermediates"],
    )
    out["genmd4_loss"], out["genmd4_zt"] = loss, zt

    # MD4.__call__: antithetic (stratified) times, the mean loss in bits per token (eps = 0: no recon term)
    model = ProbeMD4(shape, vocab_size=VOCAB, classes=0, cont_time=True, noise_schedule_type="cosine")
    stats, seen = model.apply({}, x0, rngs={"sample": next(keys)}, mutable=["intermediates"])
    out["call_loss"] = stats["loss"]
    out["call_t"], out["call_zt"] = seen["intermediates"]["t"][0], seen["intermediates"]["zt"][0]
    return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# ours on the same inputs (no md4 needed: tests/test_discrete_md4.py runs this on the fixture)
# ------------------------------------------------------------------------------------------------


def _denoiser(process, ref):
    return CategoricalDenoiser(lambda x, t: ref["logits"], process)


def ours(ref, schedules: tuple[str, ...] = tuple(SCHEDULES)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """quantity -> (ours, MD4's) for the quantities of the fixture `ref` (a mapping of arrays): those
    of `schedules` (names of SCHEDULES), GenMD4's and MD4.__call__'s."""
    numeric = {k: v for k, v in ref.items() if np.issubdtype(np.asarray(v).dtype, np.number)}
    values = jax.jit(_our_values, static_argnums=1)(numeric, schedules)  # one program, one compilation
    return {name: (np.asarray(value), np.asarray(ref[name])) for name, value in values.items()}


def _our_values(ref, schedules) -> dict[str, jax.Array]:
    x0, t_batch, times = ref["x0"], ref["t_batch"], ref["times"]
    values = {}

    def put(name, value):
        values[name] = value

    for name in schedules:
        schedule = SCHEDULES[name]
        process = MaskedProcess.create(VOCAB, schedule)
        alpha, slope = jax.jvp(lambda u: process.alpha(u)[:, 0], (times,), (jnp.ones_like(times),))  # noqa: B023
        put(f"{name}_alpha", alpha)
        put(f"{name}_dalpha", slope)
        put(f"{name}_weight", -process.unmasking_rate(times)[:, 0])
        denoiser = _denoiser(process, ref)
        put(f"{name}_loss_cont", masked_elbo_integrand(denoiser, x0, ref[f"{name}_zt_cont"], t_batch))
        t, zt = ref[f"{name}_t_T{DISCRETE_STEPS}"], ref[f"{name}_zt_T{DISCRETE_STEPS}"]
        put(f"{name}_loss_T{DISCRETE_STEPS}", DISCRETE_STEPS * step_kl(denoiser, x0, zt, t - 1.0 / DISCRETE_STEPS, t))
        for grid in STEP_GRIDS:
            s, t = (jnp.full((BATCH,), v) for v in ref[f"{name}_step_{grid}_st"])
            key = ref[f"{name}_step_{grid}_key"]
            put(f"{name}_step_{grid}", DiscreteAncestral().step(denoiser, key, ref["z_partial"], s, t))

    process = MaskedProcess.create(VOCAB, LearnedPolynomial(jnp.log(ref["genmd4_power"])))
    alpha, slope = jax.jvp(process.alpha, (times,), (jnp.ones_like(times),))
    put("genmd4_alpha", alpha)
    put("genmd4_dalpha", slope)
    put("genmd4_weight", -process.unmasking_rate(times))
    put("genmd4_loss", masked_elbo_integrand(_denoiser(process, ref), x0, ref["genmd4_zt"], t_batch))

    put("call_t", DiscreteTimes("stratified").from_uniforms(ref["call_t"][0], BATCH))
    denoiser = _denoiser(MaskedProcess.create(VOCAB, CosineSchedule()), ref)
    nats = masked_elbo_integrand(denoiser, x0, ref["call_zt"], ref["call_t"])
    put("call_loss", jnp.mean(nats) / (LENGTH * math.log(2.0)))
    return values


def max_relative_error(mine, reference) -> float:
    """max |ours - MD4| / max(|MD4|, 1e-6) (for token arrays: the fraction of tokens that differ)."""
    mine, reference = np.asarray(mine, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(mine - reference) / np.maximum(np.abs(reference), 1e-6)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--md4", required=True, help="an md4 checkout (the folder holding md4/)")
    parser.add_argument("--commit", default="", help="the checkout's commit, recorded with the results")
    args = parser.parse_args(argv)
    ref = make_reference(args.md4)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    atomic_write(FIXTURE, lambda f: np.savez(f, **ref, md4_commit=np.asarray(args.commit)))
    errors = {}
    for name, (mine, theirs) in ours(ref).items():
        tokens = np.issubdtype(theirs.dtype, np.integer)
        errors[name] = float(np.mean(mine != theirs)) if tokens else max_relative_error(mine, theirs)
        print(f"{name:28s} {'tokens differing' if tokens else 'max relative error':20s} {errors[name]:.2e}")
    write_results("md4_equality", {"md4_commit": args.commit, "errors": errors}, equality_markdown(errors, args.commit))


# the table's rows: (label, MD4's side, ours, the fixture's quantity suffix)
ROWS = [
    ("alpha(t)", "MaskingSchedule.alpha", "MaskedProcess.alpha", "alpha"),
    ("alpha'(t)", "MaskingSchedule.dalpha", "jax.jvp(MaskedProcess.alpha)", "dalpha"),
    ("ELBO weight", "dgamma_times_alpha", "-MaskedProcess.unmasking_rate", "weight"),
    ("continuous-time loss per example", "MD4.diffusion_loss (cont_time)", "masked_elbo_integrand", "loss_cont"),
    ("20-step loss per example", "MD4.diffusion_loss (timesteps=20)", "20 * step_kl", "loss_T20"),
    ("ancestral step, uniform grid", "ancestral_sample_step (tokens)", "DiscreteAncestral().step", "step_uniform"),
    ("ancestral step, cosine grid", "ancestral_sample_step (tokens)", "DiscreteAncestral().step", "step_cosine"),
]


def equality_markdown(errors: dict[str, float], commit: str) -> str:
    """The per-quantity table: max relative error (tokens: the fraction differing) per schedule."""
    rows = [
        [label, f"`{theirs}`", f"`{mine}`"] + [f"{errors[f'{s}_{key}']:.1e}" for s in SCHEDULES]
        for label, theirs, mine, key in ROWS
    ]
    gen = [
        ["alpha_v(t) (t, vocab)", "`LearnableVecMaskingSchedule.alpha`", "`LearnedPolynomial.alpha`", "genmd4_alpha"],
        ["alpha_v'(t)", "`...dalpha`", "`jax.jvp(LearnedPolynomial.alpha)`", "genmd4_dalpha"],
        ["ELBO weight", "`...dgamma_times_alpha`", "`-unmasking_rate`", "genmd4_weight"],
        ["loss per example", "`GenMD4.diffusion_loss`", "`masked_elbo_integrand`", "genmd4_loss"],
        ["antithetic times", "`MD4.__call__` t", "`DiscreteTimes('stratified').from_uniforms`", "call_t"],
        ["mean loss, bits/token", "`MD4.__call__` loss", "mean `masked_elbo_integrand` / (L log 2)", "call_loss"],
    ]
    return (
        f"# Equality with MD4 (google-deepmind/md4 at {commit or 'unknown commit'})\n\n"
        "Made by `python -m experiments.peers.make_md4_fixtures --md4 <checkout>` from a run of MD4's code "
        "(eps = 0 schedules, fixed random logits as the network, MD4's own draws of z_t and its keys); fixture "
        "tests/fixtures/md4/md4_reference.npz, checked by tests/test_discrete_md4.py. float32 on both sides. "
        "md4's code ran unchanged; the local tensorflow-probability 0.25 needed its JAX backend's removed "
        "`pytype_aval_mappings` registrations wrapped in try/except to import (module docstring). "
        "Max relative error, max |ours - MD4| / max(|MD4|, 1e-6); for tokens the fraction that differ.\n\n"
        + markdown_table(["quantity", "MD4", "ours"] + [f"`{s}`" for s in SCHEDULES], rows)
        + "\n\nGenMD4 (learnable per-token polynomial, random w) and MD4's loss as a whole (cosine):\n\n"
        + markdown_table(["quantity", "MD4", "ours", "error"], [r[:3] + [f"{errors[r[3]]:.1e}"] for r in gen])
        + "\n"
    )


if __name__ == "__main__":
    main()
