"""Configs stored with checkpoints by an older diffjax load under today's names and keys."""

import json
import os

import pytest

from diffjax import losses
from diffjax.samplers import GRIDS, SOLVERS
from diffjax.samplers.grids import FlowTime
from diffjax.samplers.heun import EDMStochastic
from diffjax.training.config import ConfigError, base_config, upgrade_config_dict, validate_config
from diffjax.training.from_config import _loss_option
from diffjax.training.load import config_from_metadata
from diffjax.validation import build_named


def older_config(**loss):
    """Today's default config as the version before the option dicts stored it: renamed loss,
    solver and grid names, flat loss keys, and a key that did not exist yet removed."""
    stored = base_config().to_dict()
    del stored["loss"]["weighting_options"], stored["loss"]["time_sampler_options"]
    stored["loss"].update(
        min_snr_gamma=5.0,
        sigmoid_bias=2.0,
        antithetic=False,
        lognormal_mean=-1.0,
        lognormal_std=1.4,
        logit_normal_mean=0.0,
        logit_normal_std=1.0,
        **loss,
    )
    stored["sample"].update(solver="edm", grid="flow")
    return stored


def test_an_older_edm_config_loads_with_its_settings():
    config = config_from_metadata({"config": older_config(prediction="edm", weighting="edm", time_sampler="lognormal")})
    validate_config(config)
    assert (config.loss.prediction, config.loss.weighting) == ("edm_preconditioned", "edm_weighting")
    assert (config.sample.solver, config.sample.grid) == ("edm_stochastic", "flow_time")
    assert _loss_option(config, "time_sampler", losses.TIME_SAMPLERS) == losses.LogNormal(mean=-1.0, std=1.4)
    assert "min_snr_gamma" not in config.loss  # it configured a weighting this run did not use
    assert isinstance(build_named(SOLVERS, config.sample.solver, {}, "sample.solver"), EDMStochastic)
    assert isinstance(build_named(GRIDS, config.sample.grid, {}, "sample.grid"), FlowTime)


def test_flat_keys_move_into_the_selected_options():
    upgraded, changes = upgrade_config_dict(older_config(weighting="min_snr", time_sampler="importance"))
    assert upgraded["loss"]["weighting_options"] == {"gamma": 5.0}
    assert upgraded["loss"]["time_sampler"] == "uniform_log_snr"
    assert upgraded["loss"]["time_sampler_options"] == {}  # added with its default
    assert "loss.min_snr_gamma -> loss.weighting_options.gamma" in changes
    assert "loss.time_sampler: 'importance' -> 'uniform_log_snr'" in changes


def test_a_current_config_is_unchanged():
    current = base_config().to_dict()
    upgraded, changes = upgrade_config_dict(current)
    assert upgraded == current and changes == []


def test_a_former_solver_name_in_a_new_config_is_named():
    config = base_config()
    config.sample.solver = "edm"
    with pytest.raises(ConfigError, match="'edm' is now called 'edm_stochastic'"):
        validate_config(config)


def test_a_config_stored_by_an_older_version_validates():
    """The config stored with the run behind the committed MNIST sample-quality table."""
    path = os.path.join(os.path.dirname(__file__), "fixtures", "config_2026_11_mnist.json")
    with open(path) as f:
        stored = json.load(f)["config"]
    config = config_from_metadata({"config": stored})
    validate_config(config)
    assert config.loss.prediction == "edm_preconditioned"
    assert _loss_option(config, "time_sampler", losses.TIME_SAMPLERS) == losses.LogNormal(mean=-1.2, std=1.2)
    assert _loss_option(config, "weighting", losses.WEIGHTINGS) == losses.Constant()
