"""Every configs/*.py builds a run with prepare_run (nothing is compiled), the CIFAR-10 configs use the
published architectures (whose parameter counts tests/test_models.py checks), configs inherit their
family's recipe, and the command line sets any key (options included) or names the nearest valid one."""

import dataclasses
import importlib
import pathlib
import re

import helpers
import pytest

from diffjax import models
from diffjax.data import DataInfo, dataset_info
from diffjax.data.config import FILE_SOURCES
from diffjax.training import loop
from diffjax.training.config import (
    ConfigError,
    apply_overrides,
    describe_config,
    model_preset_overrides,
    process_options,
    split_config_arguments,
    validate_config,
)
from experiments.benchmarks.train_step import prepare_synthetic_run

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")

# The published models of the papers the CIFAR-10 configs reproduce, and their parameter counts in
# millions as EDM's Table 7 gives them (score-SDE DDPM++ / NCSN++ cont., EDM's DDPM++ config F).
CIFAR_PRESETS = {
    "cifar10_ddpmpp_vp": ("DDPM++-cifar10", 61.80),
    "cifar10_ncsnpp_ve": ("NCSN++-cifar10", 62.76),
    "cifar10_edm": ("DDPM++-cifar10-edm", 55.73),
}
# Fields that do not change the architecture: what the network is fed, precision, memory.
NON_ARCHITECTURE = {"time_scale", "dtype", "param_dtype", "attention_impl", "remat", "scan_layers"}


def _module(name):
    return importlib.import_module(f"configs.{name}")


def _buildable():
    for name in CONFIGS:
        if getattr(_module(name), "BENCHMARK_ONLY", False) or getattr(_module(name), "FAMILY_BASE", False):
            continue
        yield name


def test_the_cifar_configs_exist():
    assert set(CIFAR_PRESETS) <= set(CONFIGS) and "dit_latents" in CONFIGS


@pytest.mark.parametrize("name", list(_buildable()))
def test_config_builds_a_run(name, tmp_path):
    config = _module(name).get_config()
    data = config.data
    if data.source in FILE_SOURCES and not pathlib.Path(data.path).exists():
        pytest.skip(f"{data.path} is not present")
    run = loop.prepare_run(config, str(tmp_path))
    assert config.train.batch_size % run.mesh.devices.size == 0
    if name in CIFAR_PRESETS:  # the model the run trains (data-derived fields included)
        assert round(run.spec.num_params / 1e6, 2) == CIFAR_PRESETS[name][1]


@pytest.mark.parametrize("name, preset", [(name, preset) for name, (preset, _) in CIFAR_PRESETS.items()])
def test_cifar_configs_use_the_published_architectures(name, preset):
    config = _module(name).get_config()
    assert config.model.name == preset and not config.model.class_conditional
    ours = models.get_config(preset, **config.model.overrides.to_dict())
    published = models.PRESETS[preset]
    changed = {f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(published, f.name)}
    assert changed <= NON_ARCHITECTURE, changed


def test_benchmark_only_dit_config_builds_with_synthetic_latents(tmp_path):
    module = _module("dit_latents")
    config = module.get_config()
    assert module.BENCHMARK_ONLY and config.model.name.startswith("DiT-")
    validate_config(config)
    with pytest.raises(FileNotFoundError, match="build_latent_cache"):
        loop.prepare_run(config, str(tmp_path))  # no ImageNet latent cache offline
    info = DataInfo(module.LATENT_SHAPE, module.LATENT_SHAPE, {"train": 1}, module.NUM_CLASSES)
    run = prepare_synthetic_run(config, str(tmp_path), info)
    assert run.image_shape == module.LATENT_SHAPE and run.spec.num_classes == module.NUM_CLASSES
    ours = models.get_config(config.model.name, **config.model.overrides.to_dict())
    assert ours == models.PRESETS[config.model.name]


# ------------------------------------------------------------------------------------------------
# configs inherit from a family base
# ------------------------------------------------------------------------------------------------

FAMILIES = {"default": ["mnist"], "cifar10_base": ["cifar10_ddpmpp_vp", "cifar10_ncsnpp_ve", "cifar10_edm"]}


@pytest.mark.parametrize("base, members", FAMILIES.items())
def test_configs_start_from_their_family_base(base, members):
    """Each member calls its base's get_config() and changes it: keys it leaves alone keep the base's
    value (a change in the base reaches every member), and the base itself is valid."""
    validate_config(_module(base).get_config())
    for member in members:
        source = (CONFIG_DIR / f"{member}.py").read_text()
        assert f"from configs import {base}" in source and f"{base}.get_config()" in source
    kept = {"data", "optim.b1", "optim.b2", "optim.eps", "eval", "mesh"}
    for member in members:
        config, reference = _module(member).get_config(), _module(base).get_config()
        for key in kept:
            section, _, leaf = key.partition(".")
            ours = config[section][leaf] if leaf else config[section]
            theirs = reference[section][leaf] if leaf else reference[section]
            if member == "mnist" and key == "data":
                continue  # mnist changes the data set
            assert ours == theirs, (member, key)


def test_cifar_family_shares_the_score_sde_recipe():
    vp, ve = _module("cifar10_ddpmpp_vp").get_config(), _module("cifar10_ncsnpp_ve").get_config()
    base = _module("cifar10_base").get_config()
    assert vp.optim == ve.optim == base.optim and vp.data == ve.data == base.data
    assert vp.train == base.train and ve.train.ema_decay == 0.999 and ve.train.num_steps == base.train.num_steps


def test_option_dicts_hold_only_changes():
    """Library defaults live with the objects: a config's option dicts hold only what it changes."""
    assert process_options("edm").to_dict() == {}
    assert process_options("vp", beta_max=10.0).to_dict() == {"beta_max": 10.0}
    assert model_preset_overrides("unet-small", image_size=28, attn_resolutions=(7,)).to_dict() == {
        "attn_resolutions": (7,)
    }
    with pytest.raises(ConfigError, match=r"unknown option 'beta_maxx' for process 'vp' \(did you mean 'beta_max'\?\)"):
        process_options("vp", beta_maxx=10.0)
    config = _module("default").get_config()
    assert config.loss.weighting_options.to_dict() == {} and config.loss.time_sampler_options.to_dict() == {}


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


CONFIG_TYPOS = [
    ("train.num_stepz", "3", "unknown config key 'train.num_stepz'; .*did you mean 'train.num_steps'\\?"),
    ("trian.num_steps", "3", "unknown config key 'trian.num_steps'; .*did you mean 'train.num_steps'\\?"),
    (
        "model.overrides.num_res_blockz",
        "1",
        "config.model.overrides: unknown option 'num_res_blockz' for model preset 'unet-small' "
        "\\(did you mean 'num_res_blocks'\\?\\)",
    ),
]


@pytest.mark.parametrize("key, value, message", CONFIG_TYPOS, ids=[key for key, _, _ in CONFIG_TYPOS])
def test_config_typos_name_the_nearest_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(apply_overrides(_module("default").get_config(), [(key, value)]))


def test_config_typo_on_the_command_line_is_one_line(tmp_path):
    """What the CLI prints for any ConfigError (test_config_typos_name_the_nearest_key checks each
    message): one line on stderr, exit status 2, nothing written."""
    key, value, message = CONFIG_TYPOS[2]
    done = helpers.run_cli(f"--workdir={tmp_path / 'run'}", f"--config.{key}={value}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffjax: error: "), done.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_help_lists_the_flags_and_how_to_list_config_keys():
    done = helpers.run_cli("--help", timeout=120)
    assert done.returncode == 0
    for text in ("--workdir", "--mode", "--config", "keys", "--config.<key>=<value>"):
        assert text in done.stdout, text


def test_keys_mode_lists_every_key_with_its_value_and_options():
    done = helpers.run_cli(
        "--config=configs/cifar10_edm.py",
        "--mode=keys",
        "--config.sample.solver=ddim",
        "--config.sample.solver_options.eta=0.5",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "train.num_steps = 390625  # optimizer steps of the run" in lines
    assert "sample.solver_options.eta = 0.5  # set; option of solver 'ddim'" in lines
    assert "sample.grid_options.rho = 7.0  # set; option of grid 'karras'" in lines  # the grid was not switched
    assert "process.options.sigma_max = 80.0  # set; option of process 'edm'" in lines
    listed = {line.split(" ")[0] for line in lines}
    assert {"seed", "data.name", "loss.sigma_data", "mesh.rules", "eval.fid"} <= listed


def test_split_config_arguments_forms():
    rest, overrides = split_config_arguments(
        ["prog", "--workdir=w", "--config.a.b=1", "--config.c", "x y", "--config.d", "--noconfig.e", "--mode=keys"]
    )
    assert rest == ["prog", "--workdir=w", "--mode=keys"]
    assert overrides == [("a.b", "1"), ("c", "x y"), ("d", "true"), ("e", "false")]


@pytest.mark.parametrize(
    "overrides, options, grid_options",
    [
        ([("sample.solver", "ddim"), ("sample.solver_options.eta", "0.5")], {"eta": 0.5}, {}),
        ([("sample.solver_options.s_churn", "10"), ("sample.solver", "edm_stochastic")], {"s_churn": 10.0}, {}),
        ([("sample.grid", "karras"), ("sample.grid_options.rho", "7")], {}, {"rho": 7.0}),
    ],
)
def test_solver_and_grid_options_from_the_command_line(overrides, options, grid_options, tmp_path):
    config = apply_overrides(_module("default").get_config(), overrides)
    assert config.sample.solver_options.to_dict() == options and config.sample.grid_options.to_dict() == grid_options
    loop.prepare_run(config, str(tmp_path))  # traces sample() with these options (nothing is compiled)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [("sample.solver", "ddim"), ("sample.solver_options.etta", "0.5")],
            r"config.sample.solver_options: unknown option 'etta' for solver 'ddim' \(did you mean 'eta'\?\)",
        ),
        (  # the library default depends on the steps, so options need a solver's name
            [("sample.solver_options.order", "2")],
            r"config.sample.solver_options = \{'order': 2\} with sample.solver = '' \(the library default, which "
            r"depends on sample.steps\): name the solver the options are for",
        ),
        (
            [("sample.solver", "ddim"), ("sample.grid_options.rho", "7")],
            r"config.sample.grid_options = \{'rho': 7\} with sample.grid = '' \(the solver's default grid\): "
            "name the grid",
        ),
        (
            [("sample.grid", "karras"), ("sample.grid_options.rhoo", "7")],
            r"config.sample.grid_options: unknown option 'rhoo' for grid 'karras' \(did you mean 'rho'\?\)",
        ),
        ([("sample.solver", "ddim"), ("sample.solver_options.eta", "'high'")], "option eta of solver 'ddim' must be"),
        ([("train.num_steps", "3.5")], r"config.train.num_steps = '3.5' is not allowed; expected an int"),
        ([("sample.solver_options", "{}")], "config.sample.solver_options is a group of keys"),
    ],
)
def test_bad_options_from_the_command_line_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(apply_overrides(_module("default").get_config(), overrides))


def test_switching_process_from_the_command_line(tmp_path):
    """A new process.name empties process.options (the old process's options are dropped) before the
    command line's process options apply, in any order; EDM's loss keys work with any process."""
    edm = _module("cifar10_edm").get_config()
    config = apply_overrides(edm, [("process.options.beta_max", "10"), ("process.name", "vp")])
    assert config.process.name == "vp" and config.process.options.to_dict() == {"beta_max": 10.0}
    assert edm.process.options.to_dict() == {"sigma_min": 0.002, "sigma_max": 80.0}  # the input is not changed
    assert (
        config.loss.prediction == "edm_preconditioned" and config.loss.time_sampler == "lognormal"
    )  # kept, and valid with vp
    validate_config(config)
    default = apply_overrides(_module("default").get_config(), [("process.name", "vp")])
    run = loop.prepare_run(default, str(tmp_path))
    assert type(run.process).__name__ == "VP"
    same = apply_overrides(edm, [("process.name", "edm")])  # not a change: options kept
    assert same.process.options.to_dict() == edm.process.options.to_dict()


def test_data_name_selects_the_data_set_from_the_command_line():
    config = apply_overrides(
        _module("default").get_config(), [("data.name", "mnist"), ("model.overrides.attn_resolutions", "(7,)")]
    )
    assert config.data.name == "mnist" and config.data.source == "npz" and config.data.image_size == 28
    assert config.data.path.endswith("mnist.npz")
    if pathlib.Path(config.data.path).exists():
        assert dataset_info(config.data).num_examples["train"] == 60000
    with pytest.raises(ConfigError, match=r"unknown data.name 'mnst' \(did you mean 'mnist'\?\)"):
        apply_overrides(_module("default").get_config(), [("data.name", "mnst")])


def test_describe_config_marks_set_and_default_options():
    text = describe_config(_module("cifar10_ncsnpp_ve").get_config())
    assert "sample.solver_options.snr = 0.16  # set; option of solver 'pc'" in text
    assert "process.options.t_min = 0.0  # default of process 've'" in text
