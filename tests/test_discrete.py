"""diffjax.discrete against exact answers on an enumerable distribution (sequences of 4 tokens over 3
symbols from a random Markov chain, whose exact conditionals are the exact denoiser): transition
matrices, Bayes posteriors, the ELBOs against the exact log-likelihood, zero-mean loss gradients at the
exact denoiser, sampler convergence in total variation, and bad input refused before tracing."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.discrete.denoisers import CategoricalDenoiser, discrete_guidance
from diffjax.discrete.likelihood import discrete_elbo_nats, masked_elbo_nats
from diffjax.discrete.losses import (
    d3pm_hybrid_loss,
    make_discrete_loss_fn,
    masked_diffusion_loss,
    masked_elbo_integrand,
    step_kl,
)
from diffjax.discrete.processes import (
    D3PM,
    CosineSchedule,
    LearnedPolynomial,
    LinearSchedule,
    MaskedProcess,
    PolynomialSchedule,
    UniformProcess,
    build_discrete_process,
)
from diffjax.discrete.samplers import (
    BlockDiffusion,
    ConfidenceUnmasking,
    DiscreteAncestral,
    FirstHitting,
    TauLeaping,
    sample_tokens,
)
from diffjax.discrete.toy import EnumerableSequences
from diffjax.training.state import create_train_state, ema, make_train_step

V, L = 3, 4


@pytest.fixture(scope="module")
def dist():
    return EnumerableSequences.markov_chain(0, V, L)


def all_processes():
    return [
        MaskedProcess.create(V),
        MaskedProcess.create(V, CosineSchedule()),
        MaskedProcess.create(V, PolynomialSchedule(2.0)),
        MaskedProcess.create(V, LearnedPolynomial(jnp.log(jnp.array([0.5, 1.0, 2.0])))),
        UniformProcess(V),
        UniformProcess(V, CosineSchedule()),
        D3PM.create(V, "uniform", 8),
        D3PM.create(V, "absorbing", 8),
        D3PM.create(V, "gaussian", 8),
        D3PM.create(V, "band", 8),
    ]


PROCESS_IDS = ["masked", "masked_cos", "masked_poly", "masked_learned", "uniform", "uniform_cos"] + [
    f"d3pm_{k}" for k in ("uniform", "absorbing", "gaussian", "band")
]


# ----------------------------------------------------------------------------------------------------------
# matrices
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "process",
    [p if i in (3, 8) else pytest.param(p, marks=pytest.mark.slow) for i, p in enumerate(all_processes())],
    ids=PROCESS_IDS,
)
def test_matrices_are_stochastic_and_compose(process):
    s, t = jnp.array([0.25, 0.5]), jnp.array([0.75, 1.0])
    qs, qt, qst = process.marginal_matrix(s), process.marginal_matrix(t), process.transition_matrix(s, t)
    np.testing.assert_allclose(qt.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(qst.sum(-1), 1.0, atol=1e-5)
    assert float(qst.min()) >= -1e-6
    np.testing.assert_allclose(qt, qs @ qst, atol=1e-5)  # Qbar_t = Qbar_s Q_{s,t}
    np.testing.assert_allclose(process.marginal_matrix(jnp.zeros(1))[0], np.eye(V, process.num_states), atol=1e-6)


@pytest.mark.parametrize("transition", ["uniform", "absorbing", "gaussian", "band"])
def test_d3pm_cumulative_products_are_repeated_multiplication(transition):
    process = D3PM.create(4, transition, 6, band=2)
    steps = np.asarray(process.step_matrices, np.float64)
    np.testing.assert_allclose(steps.sum(-1), 1.0, atol=1e-5)
    assert steps.min() >= -1e-6
    for t in range(7):
        expected = np.linalg.multi_dot([np.eye(steps.shape[1]), np.eye(steps.shape[1]), *steps[:t]])
        np.testing.assert_allclose(process.cumulative[t], expected, atol=1e-5)
    # Q_{s,t} for s = 2/6, t = 5/6 is Q_3 Q_4 Q_5
    np.testing.assert_allclose(process.transition_matrix(2 / 6, 5 / 6), steps[2] @ steps[3] @ steps[4], atol=1e-5)


@pytest.mark.parametrize(
    "transition", ["band", *[pytest.param(k, marks=pytest.mark.slow) for k in ("uniform", "absorbing", "gaussian")]]
)
def test_d3pm_posterior_is_bayes_by_enumerating_paths(transition):
    process = D3PM.create(3, transition, 3)
    q = np.asarray(process.step_matrices, np.float64)
    n = process.num_states
    for x0, x3 in itertools.product(range(3), range(n)):
        # q(x1 | x3, x0) by summing the chain x0 -> x1 -> x2 -> x3 over x2
        joint = np.array([sum(q[0][x0, a] * q[1][a, b] * q[2][b, x3] for b in range(n)) for a in range(n)])
        if joint.sum() < 1e-12:
            continue
        got = process.posterior_probs(jnp.array([[x3]]), jax.nn.one_hot(jnp.array([[x0]]), 3), 1 / 3, 1.0)
        np.testing.assert_allclose(got[0, 0], joint / joint.sum(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("process", [MaskedProcess.create(V, CosineSchedule()), UniformProcess(V)], ids=str)
def test_rate_matrix_is_the_derivative_of_the_transition(process):
    t, h = jnp.float32(0.5), 1e-3
    numeric = (process.transition_matrix(t, t + h) - jnp.eye(process.num_states)) / h
    np.testing.assert_allclose(process.rate_matrix(t + h / 2), numeric, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_masked_closed_form_rates_match_the_generic_ratio_form(dist):
    process = MaskedProcess.create(V, CosineSchedule())
    x_t = jnp.array([[0, 3, 3, 2], [3, 3, 3, 3]])
    mu = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, L, V)), axis=-1)
    generic = super(MaskedProcess, process).reverse_rates(x_t, mu, jnp.float32(0.4))
    np.testing.assert_allclose(process.reverse_rates(x_t, mu, jnp.float32(0.4)), generic, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# exact denoiser: ELBOs and zero-mean gradients by enumeration
# ----------------------------------------------------------------------------------------------------------


PATTERNS = np.array(list(itertools.product([0, 1], repeat=L)), bool)  # which positions are masked
NODES, WEIGHTS = np.polynomial.legendre.leggauss(64)


def _pattern_probs(process, x0, t):
    """q(x_t = pattern | x0) for every mask pattern at every time t: (T, P)."""
    a = process.alpha(t)[:, x0]  # (T, L) alpha_t(x0^n)
    return jnp.prod(jnp.where(PATTERNS[None], 1 - a[:, None], a[:, None]), axis=-1)


def _continuous_bound(dist, process, x0, theta=0.0, nodes=NODES, weights=WEIGHTS):
    """-ELBO in continuous time by Gauss-Legendre in t and enumeration of x_t."""
    den = CategoricalDenoiser(lambda x, s: dist.x0_logits(process, x, s) + theta, process)
    x_t = jnp.where(PATTERNS, process.mask_id, x0[None])
    p, t = x_t.shape[0], jnp.asarray((nodes + 1) / 2, jnp.float32)
    vals = masked_elbo_integrand(
        den, jnp.tile(x0, (t.shape[0] * p, 1)), jnp.tile(x_t, (t.shape[0], 1)), jnp.repeat(t, p)
    )
    return jnp.sum(weights / 2 * jnp.sum(_pattern_probs(process, x0, t) * vals.reshape(-1, p), axis=1))


def _discrete_bound(dist, process, x0, num_steps):
    """The num_steps-step -ELBO by enumeration of x_t (the prior term is 0 for the masked process)."""
    den = CategoricalDenoiser(dist.denoiser_fn(process), process)
    x_t = jnp.where(PATTERNS, process.mask_id, x0[None])
    p = x_t.shape[0]
    i = jnp.arange(1, num_steps + 1) / num_steps
    ti, si = jnp.repeat(i, p), jnp.repeat(i - 1 / num_steps, p)
    kls = step_kl(den, jnp.tile(x0, (ti.shape[0], 1)), jnp.tile(x_t, (num_steps, 1)), si, ti).reshape(num_steps, p)
    probs = _pattern_probs(process, x0, i)
    return jnp.sum(jnp.where(probs > 0, probs * kls, 0.0))


continuous_bound = jax.jit(_continuous_bound, static_argnums=1)
discrete_bound = jax.jit(_discrete_bound, static_argnums=(1, 3))


@pytest.mark.parametrize(
    "schedule", [LinearSchedule(), pytest.param(CosineSchedule(), marks=pytest.mark.slow)], ids=["linear", "cosine"]
)
def test_masked_elbo_is_below_the_exact_likelihood_and_reaches_it(dist, schedule):
    """Continuous time: -ELBO(x0) = -log p(x0) for every x0 (any-order autoregression with exact
    conditionals). T steps: the bound of the T-step model, so only its mean over the data is >= the
    entropy H(p); it decreases to H(p) as T grows."""
    process = MaskedProcess.create(V, schedule)
    seqs = dist.all_sequences()
    nll = -dist.log_prob(seqs)
    cont = jax.jit(jax.vmap(lambda x0: _continuous_bound(dist, process, x0)))(seqs)
    np.testing.assert_allclose(cont, nll, atol=2e-3)
    entropy = float(jnp.sum(dist.probs * nll))
    steps = (1, 8, 64)
    gaps = [float(jnp.sum(dist.probs * expected_discrete_bound(dist, process, n))) - entropy for n in steps]
    assert all(g >= -1e-4 for g in gaps), gaps  # E[-ELBO_T] >= H(p)
    assert all(a >= b - 1e-5 for a, b in zip(gaps, gaps[1:])), gaps  # tightens as T grows
    assert gaps[-1] < 0.05 and gaps[-1] < gaps[0] / 20, gaps


@functools.partial(jax.jit, static_argnums=(1, 2))
def expected_discrete_bound(dist, process, num_steps):
    return jax.vmap(lambda x0: _discrete_bound(dist, process, x0, num_steps))(dist.all_sequences())


@pytest.mark.slow
def test_monte_carlo_bounds_agree_with_enumeration(dist):
    process = MaskedProcess.create(V)
    den = CategoricalDenoiser(dist.denoiser_fn(process), process)
    x0 = jnp.tile(dist.all_sequences()[40], (512, 1))
    nll = -float(dist.log_prob(x0[:1])[0])
    mc = masked_elbo_nats(den, jax.random.key(0), x0, 4)
    assert float(mc.mean()) == pytest.approx(nll, abs=4 * float(mc.std()) / np.sqrt(512) + 1e-3)
    exact4 = float(discrete_bound(dist, process, x0[0], 4))
    mc4 = discrete_elbo_nats(den, jax.random.key(1), x0, 4)
    assert float(mc4.mean()) == pytest.approx(exact4, abs=4 * float(mc4.std()) / np.sqrt(512) + 1e-3)


def test_masked_loss_has_zero_mean_gradient_at_the_exact_denoiser(dist):
    process = MaskedProcess.create(V, CosineSchedule())
    nodes, weights = np.polynomial.legendre.leggauss(8)

    def expected_loss(theta):
        per_sequence = jax.vmap(lambda x0: _continuous_bound(dist, process, x0, theta, nodes, weights))
        return jnp.sum(dist.probs * per_sequence(dist.all_sequences()))

    grad = jax.jit(jax.grad(expected_loss))
    assert float(jnp.abs(grad(jnp.zeros(V))).max()) < 1e-4
    assert float(jnp.abs(grad(jnp.array([0.3, 0.0, -0.2]))).max()) > 1e-2  # and the check can fail


@pytest.mark.slow
def test_d3pm_hybrid_loss_has_zero_mean_gradient_at_the_exact_denoiser(dist):
    process = D3PM.create(V, "uniform", 4)
    seqs = dist.all_sequences()
    x0 = jnp.repeat(seqs, seqs.shape[0], axis=0)
    x_t = jnp.tile(seqs, (seqs.shape[0], 1))
    for step in (1, 3):
        t, s = step / 4, (step - 1) / 4
        weight = jnp.repeat(dist.probs, seqs.shape[0]) * jnp.exp(
            jnp.sum(jnp.log(jnp.take_along_axis(process.marginal_probs(x0, t), x_t[..., None], -1)[..., 0]), 1)
        )

        def expected(theta):
            den = CategoricalDenoiser(lambda x, u: dist.x0_logits(process, x, u) + theta, process)
            log_mu = jax.nn.log_softmax(den.logits(x_t, t), -1)
            ce = -jnp.sum(jnp.take_along_axis(log_mu, x0[..., None], -1)[..., 0], 1)
            return jnp.sum(weight * (step_kl(den, x0, x_t, s, t) + 0.01 * ce))

        assert float(jnp.abs(jax.grad(expected)(jnp.zeros(V))).max()) < 1e-4
        assert float(jnp.abs(jax.grad(expected)(jnp.array([0.3, 0.0, -0.2]))).max()) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# samplers: total variation to the table
# ----------------------------------------------------------------------------------------------------------

N = 4096


@pytest.fixture(scope="module")
def floor(dist):
    """The TV of N exact draws: the Monte Carlo floor every converged sampler sits at."""
    return dist.total_variation(dist.sample(jax.random.key(123), N))


def tv(dist, process, sampler, steps, **kwargs):
    den = CategoricalDenoiser(dist.denoiser_fn(process, kwargs.pop("time_free", False)), process, **kwargs)
    return dist.total_variation(sample_tokens(den, jax.random.key(steps), (N, L), sampler, steps).tokens)


def test_first_hitting_is_exact_at_any_step_count(dist, floor):
    process = MaskedProcess.create(V, CosineSchedule())
    den = CategoricalDenoiser(dist.denoiser_fn(process), process)
    out = sample_tokens(den, jax.random.key(0), (N, L), FirstHitting(), 1)
    assert int(out.nfe) == L
    assert dist.total_variation(out.tokens) < floor + 0.02


@pytest.mark.slow
def test_masked_ancestral_converges_and_caching_changes_nothing_but_nfe(dist, floor):
    process = MaskedProcess.create(V)
    coarse, fine = tv(dist, process, DiscreteAncestral(), 1), tv(dist, process, DiscreteAncestral(), 32)
    assert coarse > floor + 0.05 and fine < floor + 0.02, (coarse, fine, floor)
    den = CategoricalDenoiser(dist.denoiser_fn(process, time_free=True), process, time_free=True)
    plain = sample_tokens(den, jax.random.key(3), (2, L), DiscreteAncestral(), 32)
    cached = sample_tokens(den, jax.random.key(3), (2, L), DiscreteAncestral(), 32, cache=True)
    np.testing.assert_array_equal(plain.tokens, cached.tokens)
    assert int(plain.nfe) == 32 and int(cached.nfe) < 32


def tv_noise_bound(probs, n: int, failure: float = 1e-3) -> float:
    """A bound that the TV of n exact draws exceeds with probability < failure: E TV <= 1/2 sum
    sqrt(p (1 - p) / n) (Jensen), plus McDiarmid's sqrt(log(1 / failure) / (2 n)) (one draw moves the
    TV by at most 1 / n)."""
    p = np.asarray(probs, np.float64)
    return 0.5 * np.sum(np.sqrt(p * (1 - p) / n)) + np.sqrt(np.log(1 / failure) / (2 * n))


def test_block_diffusion_with_first_hitting_blocks_is_exact(dist):
    """Blocks of 2 of the 4 positions, each by first-hitting given the prefix: exact at any step count
    (7 is ignored). Drawing the blocks without their prefix (the product of the two blocks' marginals)
    would be beyond the noise bound: the test tells the two apart."""
    process = MaskedProcess.create(V, CosineSchedule())
    den = CategoricalDenoiser(dist.denoiser_fn(process, time_free=True), process, time_free=True)
    out = sample_tokens(den, jax.random.key(5), (N, L), BlockDiffusion(2), 7)
    assert int(out.nfe) == L
    bound = tv_noise_bound(dist.probs, N)
    assert dist.total_variation(out.tokens) < bound
    joint = np.asarray(dist.probs).reshape(V**2, V**2)
    independent_blocks = np.outer(joint.sum(1), joint.sum(0))
    assert 0.5 * np.abs(joint - independent_blocks).sum() > bound + 0.03


def _revealed_before(x, t):
    """A network that is sure the clean token is the number of positions already revealed (vocab 6)."""
    count = jnp.sum(x != 6, axis=1)
    return jnp.where(jnp.arange(6) == count[:, None, None], 0.0, -1e9) * jnp.ones(x.shape + (1,))


@pytest.mark.parametrize("inner", ["first_hitting", "ancestral"])
def test_block_diffusion_finishes_each_block_before_the_next(inner):
    den = CategoricalDenoiser(_revealed_before, MaskedProcess.create(6), time_free=True)
    tokens = np.asarray(sample_tokens(den, jax.random.key(0), (16, 6), BlockDiffusion(2, inner), 3).tokens)
    for b in range(3):  # block b is drawn while exactly the 2 b positions before it are clean
        block = tokens[:, 2 * b : 2 * b + 2]
        assert np.all((block >= 2 * b) & (block < 2 * b + 2)), (b, block)


@pytest.mark.slow
def test_block_diffusion_with_ancestral_blocks_converges_and_caches(dist):
    process = MaskedProcess.create(V)
    den = CategoricalDenoiser(dist.denoiser_fn(process, time_free=True), process, time_free=True)
    coarse, fine = (
        dist.total_variation(
            sample_tokens(den, jax.random.key(steps), (N, L), BlockDiffusion(2, "ancestral"), steps).tokens
        )
        for steps in (1, 32)
    )
    assert coarse > tv_noise_bound(dist.probs, N) + 0.05 and fine < tv_noise_bound(dist.probs, N), (coarse, fine)
    plain = sample_tokens(den, jax.random.key(3), (2, L), BlockDiffusion(2, "ancestral"), 32)
    cached = sample_tokens(den, jax.random.key(3), (2, L), BlockDiffusion(2, "ancestral"), 32, cache=True)
    np.testing.assert_array_equal(plain.tokens, cached.tokens)
    assert int(plain.nfe) == 2 * 32 and int(cached.nfe) < 2 * 32


@pytest.mark.slow
def test_confidence_unmasking_is_exact_one_position_per_step(dist, floor):
    process = MaskedProcess.create(V)
    assert tv(dist, process, ConfidenceUnmasking(), L) < floor + 0.02
    assert tv(dist, process, ConfidenceUnmasking(), 1) > floor + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("process", all_processes(), ids=PROCESS_IDS)
@pytest.mark.parametrize("sampler", [DiscreteAncestral(), TauLeaping()], ids=["ancestral", "tau_leaping"])
def test_every_sampler_converges_in_total_variation(dist, floor, process, sampler):
    if isinstance(sampler, TauLeaping) and not process.continuous_time:
        pytest.skip("tau-leaping needs a continuous-time process")
    if isinstance(process, D3PM):
        process = D3PM.create(V, process.transition, 64)
    values = [tv(dist, process, sampler, n) for n in (2, 64)]
    assert values[0] > values[1] and values[1] < floor + 0.03, (values, floor)


@pytest.mark.slow
def test_guidance_is_the_tilted_conditional(dist):
    process = MaskedProcess.create(V)
    other = EnumerableSequences.random_table(1, V, L)
    cond, uncond = dist.denoiser_fn(process), other.denoiser_fn(process)
    x_t, t = jnp.array([[3, 0, 3, 3]]), jnp.full((1,), 0.5)
    np.testing.assert_allclose(discrete_guidance(cond, uncond, 0.0)(x_t, t), cond(x_t, t), atol=1e-6)
    got = jax.nn.log_softmax(discrete_guidance(cond, uncond, 2.0)(x_t, t)[0, 2])
    want = np.log(np.exp(cond(x_t, t)[0, 2]) ** 3 / np.exp(uncond(x_t, t)[0, 2]) ** 2)
    np.testing.assert_allclose(got, want - np.log(np.exp(want).sum()), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# bad input, refused before anything is traced
# ----------------------------------------------------------------------------------------------------------


def _never_called(x, t):
    raise AssertionError("the network was traced")


def test_bad_input_is_refused_before_tracing(dist):
    process = MaskedProcess.create(V)
    den = CategoricalDenoiser(_never_called, process)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        MaskedProcess.create(V, mask_id=1)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 2"):
        MaskedProcess.create(1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sample_tokens(den, key, (2, L), DiscreteAncestral(), 0)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        masked_diffusion_loss(den, key, jnp.array([[0, 1, 3, 2]]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        d3pm_hybrid_loss(CategoricalDenoiser(_never_called, D3PM.create(V, "uniform", 4)), key, jnp.array([[-1, 0]]), 4)
    with pytest.raises(TypeError, match="integer array"):
        masked_elbo_nats(den, key, jnp.zeros((2, L)))
    with pytest.raises(ValueError, match="first_hitting needs a MaskedProcess"):
        sample_tokens(CategoricalDenoiser(_never_called, UniformProcess(V)), key, (2, L), FirstHitting())
    with pytest.raises(ValueError, match=r"block_size 3 does not divide the 4 positions of shape \(2, 4\)"):
        sample_tokens(CategoricalDenoiser(_never_called, process, time_free=True), key, (2, L), BlockDiffusion(3))
    with pytest.raises(ValueError, match="block needs a MaskedProcess"):
        sample_tokens(CategoricalDenoiser(_never_called, UniformProcess(V)), key, (2, L), BlockDiffusion(2))
    with pytest.raises(ValueError, match="block needs a time-free denoiser"):
        sample_tokens(den, key, (2, L), BlockDiffusion(2))
    with pytest.raises(ValueError, match="BlockDiffusion inner sampler"):
        BlockDiffusion(2, "confidence")
    with pytest.raises(ValueError, match="BlockDiffusion block_size must be an int >= 1"):
        BlockDiffusion(0)
    with pytest.raises(ValueError, match="tau_leaping needs a continuous-time"):
        sample_tokens(CategoricalDenoiser(_never_called, D3PM.create(V, "uniform", 4)), key, (2, L), TauLeaping())
    with pytest.raises(ValueError, match="time_free"):
        sample_tokens(den, key, (2, L), cache=True)
    with pytest.raises(ValueError, match="LearnedPolynomial has"):
        MaskedProcess.create(V, LearnedPolynomial.constant(V + 1)).alpha(jnp.float32(0.5))
    with pytest.raises(ValueError, match="unknown discrete process"):
        build_discrete_process("maskd", V)
    with pytest.raises(ValueError, match="unknown D3PM transition"):
        D3PM.create(V, "gausian")
    wrong_vocab = CategoricalDenoiser(lambda x, t: jnp.zeros(x.shape + (V + 1,)), process)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4, 3\)"):
        sample_tokens(wrong_vocab, key, (2, L))


# ----------------------------------------------------------------------------------------------------------
# the trainer's step factory with the discrete loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_a_table_denoiser_reaches_the_entropy(dist):
    """A lookup table of logits per x_t (4^4 states) trained with make_train_step on the masked ELBO:
    the exact -ELBO of the learned denoiser, averaged over the data, comes within 0.15 nats of H(p)."""
    process = MaskedProcess.create(V)
    powers = (V + 1) ** jnp.arange(L)

    def apply(params, x, t):
        return params[jnp.sum(x * powers, axis=-1)]

    loss_fn = make_discrete_loss_fn(apply, process, "masked_elbo", time_free=True)
    optimizer = optax.adam(0.1)
    state = create_train_state(jnp.zeros(((V + 1) ** L, L, V)), optimizer, 0)
    step = jax.jit(make_train_step(loss_fn, optimizer, ema(0.0)))
    for i in range(300):
        state, _ = step(state, dist.sample(jax.random.key(i), 256))
    table = state.params
    seqs = dist.all_sequences()
    nodes, weights = np.polynomial.legendre.leggauss(16)

    def learned_bound(x0):
        den = CategoricalDenoiser(lambda x, s: apply(table, x, s), process)
        x_t = jnp.where(PATTERNS, process.mask_id, x0[None])
        p, t = x_t.shape[0], jnp.asarray((nodes + 1) / 2, jnp.float32)
        vals = masked_elbo_integrand(
            den, jnp.tile(x0, (t.shape[0] * p, 1)), jnp.tile(x_t, (t.shape[0], 1)), jnp.repeat(t, p)
        )
        return jnp.sum(weights / 2 * jnp.sum(_pattern_probs(process, x0, t) * vals.reshape(-1, p), axis=1))

    entropy = float(-jnp.sum(dist.probs * dist.log_prob(seqs)))
    mean_bound = float(jnp.sum(dist.probs * jax.jit(jax.vmap(learned_bound))(seqs)))
    assert entropy - 1e-3 <= mean_bound < entropy + 0.15, (mean_bound, entropy)
