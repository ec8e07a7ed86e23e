"""Input validation, tested with random bad arguments: the public API (processes, denoising_loss,
sample) and the experiment config reject them with diffjax's own ValueError/TypeError, raised in
diffjax code and naming the argument (never an internal traceback from jax, orbax or Python), and
whatever they accept works."""

import dataclasses
import os
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffjax
from diffjax import losses
from diffjax import processes as P
from diffjax.denoisers import EDMPreconditioned
from diffjax.samplers import GRIDS, SOLVERS
from diffjax.validation import build_named

PACKAGE = os.path.dirname(os.path.abspath(diffjax.__file__)) + os.sep
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values of every kind, mostly wrong for any one argument.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=3),
    st.sampled_from(["eps", "uniform", "karras", "ddim", "x0"]),
    st.tuples(st.floats(-1, 2, width=32)),
    st.lists(st.integers(0, 3), max_size=2),
    st.just({}),
    st.builds(object),
    st.just(np.float32(0.5)),
    st.just(jnp.array([0.1, 0.2])),
)


@pytest.fixture(autouse=True, scope="module")
def unfiltered_tracebacks():
    """JAX hides its own frames from tracebacks; show them, so an error raised inside JAX is seen as such."""
    previous = jax.config.jax_traceback_filtering
    jax.config.update("jax_traceback_filtering", "off")
    yield
    jax.config.update("jax_traceback_filtering", previous)


def assert_own_error(call, argument: str):
    """call() returns, or raises a ValueError/TypeError from diffjax's code whose message names
    `argument`. Any other exception (AttributeError, KeyError, ...) fails the test as it is."""
    try:
        return call()
    except (ValueError, TypeError) as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{frame.filename}:{frame.lineno}"
        assert os.path.abspath(frame.filename).startswith(PACKAGE), f"raised outside diffjax at {where}: {err!r}"
        assert argument in str(err), f"{argument!r} is not named in {err!r} (raised at {where})"


def network(x, t):
    return x * jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1))


CONTINUOUS = [P.VP, P.SubVP, P.CosineVP, P.VE, P.EDM, P.FlowMatching]


@SETTINGS
@given(data=st.data(), value=JUNK)
def test_process_constructors(data, value):
    cls = data.draw(st.sampled_from(CONTINUOUS))
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    process = assert_own_error(lambda: cls(**{field: value}), field)
    if process is not None:
        t = 0.5 * (process.t_min + process.t_max)
        assert np.isfinite(float(process.alpha(t))) and np.isfinite(float(process.sigma(t)))


@SETTINGS
@given(value=JUNK, t_min=st.one_of(st.none(), JUNK))
def test_discrete_process_and_get_process(value, t_min):
    assert_own_error(lambda: P.DiscreteVP.from_betas(value), "betas")
    assert_own_error(lambda: P.DiscreteVP.from_betas(np.linspace(1e-4, 0.02, 10), t_min=t_min), "t_min")
    assert_own_error(lambda: P.get_process(value), "process")


LOSS_ARGUMENTS = [
    "prediction",
    "target",
    "weighting",
    "time_sampler",
    "t_min",
    "t_max",
    "data_key",
    "cond_keys",
    "rng_arg",
]
# (option class, field, the keyword of denoising_loss that takes it)
LOSS_OPTIONS = [
    (losses.MinSNR, "gamma", "weighting"),
    (losses.Sigmoid, "bias", "weighting"),
    (losses.EDMWeighting, "sigma_data", "weighting"),
    (losses.UniformTime, "antithetic", "time_sampler"),
    (losses.LogNormal, "mean", "time_sampler"),
    (losses.LogNormal, "std", "time_sampler"),
    (losses.LogitNormal, "std", "time_sampler"),
    (EDMPreconditioned, "sigma_data", "prediction"),
]


def _trace_loss(loss_fn, array_batch=False):
    data = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    return jax.eval_shape(loss_fn, {}, jax.random.key(0), data if array_batch else {"image": data})


@SETTINGS
@given(data=st.data(), value=JUNK)
def test_denoising_loss_arguments(data, value):
    process = data.draw(st.sampled_from([P.VP(), P.EDM(), P.FlowMatching()]))
    apply_fn = lambda params, x, t: network(x, t)  # noqa: E731
    if data.draw(st.booleans()):
        name = data.draw(st.sampled_from(LOSS_ARGUMENTS))
        make = lambda: diffjax.denoising_loss(apply_fn, process, **{name: value})  # noqa: E731
    else:  # an option object built with a junk field, then used
        cls, name, keyword = data.draw(st.sampled_from(LOSS_OPTIONS))
        make = lambda: diffjax.denoising_loss(apply_fn, process, **{keyword: cls(**{name: value})})  # noqa: E731
    loss_fn = assert_own_error(make, name)
    # Accepted: it must trace (batch entry and keyword names aside: they must match the batch and network).
    if loss_fn is not None and name not in ("data_key", "cond_keys", "rng_arg"):
        loss, aux = _trace_loss(loss_fn, array_batch=data.draw(st.booleans()))
        assert loss.shape == ()


@SETTINGS
@given(value=JUNK, first=st.booleans())
def test_denoising_loss_network_and_process(value, first):
    args = (value, P.VP()) if first else (lambda p, x, t: x, value)
    assert_own_error(lambda: diffjax.denoising_loss(*args), "apply_fn" if first else "process")


SAMPLE_ARGUMENTS = ["key", "shape", "steps", "solver", "grid", "t_min", "t_max"]


def _sample(denoiser, key, shape, **kwargs):
    """sample() traced, not compiled: validation happens while tracing."""
    return jax.eval_shape(lambda: diffjax.sample(denoiser, key, shape, **kwargs).samples)


@SETTINGS
@given(data=st.data(), value=JUNK)
def test_sample_arguments(data, value):
    denoiser = diffjax.Denoiser(network, data.draw(st.sampled_from([P.VP(), P.EDM()])), "x0")
    kwargs = {"key": jax.random.key(0), "shape": (2, 3), "steps": 3}
    name = data.draw(st.sampled_from(SAMPLE_ARGUMENTS + ["solver option", "grid option"]))
    if name == "solver option":  # the config boundary: name + options -> a validated solver object
        solver_name = data.draw(st.sampled_from(sorted(SOLVERS)))
        fields = [f.name for f in dataclasses.fields(SOLVERS[solver_name]) if f.init]
        if not fields:
            return
        name = data.draw(st.sampled_from(fields))
        kwargs["solver"] = assert_own_error(lambda: build_named(SOLVERS, solver_name, {name: value}, "solver"), name)
        if kwargs["solver"] is None:
            return
    elif name == "grid option":
        grid_name = data.draw(st.sampled_from(sorted(GRIDS)))
        name = "grid"
        kwargs["grid"] = assert_own_error(lambda: build_named(GRIDS, grid_name, {"rho": value}, "grid"), name)
        if kwargs["grid"] is None:
            return
    else:
        kwargs[name] = value
    out = assert_own_error(lambda: _sample(denoiser, kwargs.pop("key"), kwargs.pop("shape"), **kwargs), name)
    assert out is None or out.dtype == jnp.float32


@SETTINGS
@given(value=JUNK)
def test_sample_denoiser(value):
    assert_own_error(lambda: _sample(value, jax.random.key(0), (2, 3)), "denoiser")


# ------------------------------------------------------------------------------------------------
# the experiment config
# ------------------------------------------------------------------------------------------------


def _config_keys():
    """Every key, and every option the config's option dicts allow (set or not)."""
    from test_training import tiny_config

    from diffjax.training.config import FREE_FORM_KEYS, _flatten_keys, option_fields

    config = tiny_config()
    keys = sorted(_flatten_keys(config))
    for option_dict in FREE_FORM_KEYS:
        section, name = option_dict.split(".")
        options = set(option_fields(config, option_dict)) | set(config[section][name])
        keys += [f"{option_dict}.{k}" for k in sorted(options)]
    return keys


CONFIG_KEYS = _config_keys()


def _assert_config_value_refused_by_name(key, value):
    from test_training import tiny_config

    from diffjax.training.loop import prepare_run

    config = tiny_config()
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    with node.ignore_type():
        node[last] = value  # an option not set yet is added
    with tempfile.TemporaryDirectory() as workdir:
        assert_own_error(lambda: prepare_run(config, workdir), last)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(CONFIG_KEYS), value=JUNK)
def test_config_values(key, value):
    """A bad value for any key is refused by prepare_run (config validation and every check done
    before compilation) with an error naming the key."""
    _assert_config_value_refused_by_name(key, value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.overrides.model_channels", 1),  # a model check on another field (norm_groups) must name it
        ("model.overrides.channel_mult", [1]),  # ... and the attention resolutions
        ("model.overrides.norm_groups", 3),
        ("model.overrides.learn_sigma", True),  # the trainer's losses take C output channels
    ],
)
def test_config_values_found_by_the_fuzzer(key, value):
    """Cases the fuzzer above once failed on, kept as fixed examples."""
    _assert_config_value_refused_by_name(key, value)


def test_config_error_names_key_value_and_allowed():
    from test_training import tiny_config

    from diffjax.training import ConfigError, validate_config

    config = tiny_config()
    with config.train.ignore_type():
        config.train.progress_bar = "yes"
    with pytest.raises(ConfigError, match=r"config.train.progress_bar = 'yes' is not allowed; expected True or False"):
        validate_config(config)
