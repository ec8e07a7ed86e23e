"""Every configs/*.py builds a run with prepare_run (nothing is compiled), and the CIFAR-10 configs
use the published architectures (whose parameter counts tests/test_models.py checks)."""
import dataclasses
import importlib
import pathlib

import pytest

from diffjax import models
from diffjax.data import DataInfo
from diffjax.data.config import FILE_SOURCES
from diffjax.training import loop
from diffjax.training.config import ConfigError, validate_config
from experiments.benchmarks.train_step import prepare_synthetic_run

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
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
        if getattr(_module(name), "BENCHMARK_ONLY", False):
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
    with pytest.raises((ConfigError, ValueError)):
        loop.prepare_run(config, str(tmp_path))  # its data section is a placeholder
    info = DataInfo(module.LATENT_SHAPE, module.LATENT_SHAPE, {"train": 1}, module.NUM_CLASSES)
    run = prepare_synthetic_run(config, str(tmp_path), info)
    assert run.image_shape == module.LATENT_SHAPE and run.spec.num_classes == module.NUM_CLASSES
    ours = models.get_config(config.model.name, **config.model.overrides.to_dict())
    assert ours == models.PRESETS[config.model.name]
