"""score_sde's Flax checkpoints through `load_pretrained(format="score-sde")`, against score_sde's own code.

The fixtures (tests/fixtures/score_sde/) are tiny random NCSN++ (VE) and DDPM++ (VP) networks built,
saved and run by score_sde's code (experiments/peers/make_score_sde_fixtures.py): its training-state
checkpoints, its score function `get_score_fn(sde, ...)` on fixed inputs (EMA and target weights) and
its network output at that function's labels. The DDPM++ checkpoint is read three ways: as the VP SDE,
the sub-VP SDE and the discrete DDPM chain (score_sde's conventions differ, the weights do not).
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from diffjax.models.pretrained import load_pretrained
from diffjax.models.score_sde_checkpoint import (
    SCORE_SDE_CONFIGS,
    is_score_sde_checkpoint,
    latest_score_sde_checkpoint,
    read_score_sde_params,
    score_sde_config,
    score_sde_network_fn,
    score_sde_score_fn,
)
from diffjax.processes import VE, VP, DiscreteVP, SubVP

FIXTURES = Path(__file__).parent / "fixtures" / "score_sde"
CONFIGS = json.loads((FIXTURES / "configs.json").read_text())
CASES = tuple(CONFIGS)
_LOADED: dict = {}


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "reference.npz") as z:
        return {case: {k.split("/")[1]: z[k] for k in z.files if k.startswith(case + "/")} for case in CASES}


def checkpoint(case: str) -> Path:
    return FIXTURES / f"{CONFIGS[case]['checkpoint']}_checkpoint_1"


def config(case: str) -> dict:
    return CONFIGS[case]["config"]


def loaded(case: str, weights: str = "ema"):
    if (case, weights) not in _LOADED:
        _LOADED[case, weights] = load_pretrained(checkpoint(case), config=config(case), weights=weights)
    return _LOADED[case, weights]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    "case",
    [
        "ve_ncsnpp_continuous",
        "vp_ddpmpp_continuous",
        *(pytest.param(c, marks=pytest.mark.slow) for c in ("subvp_ddpmpp_continuous", "vp_ddpmpp_discrete")),
    ],
)
def test_network_and_score_equal_score_sde(case, reference):
    """Our network and score against score_sde's model_fn and get_score_fn on the same inputs. Below
    t = 0.3 the VP-family scores are compared looser: score_sde's float32 sigma(t) = sqrt(1 - exp(2 log
    alpha)) cancels near t = 0 (checked against float64 in test_vp_sigma_is_the_float64_one)."""
    pt, ref = loaded(case), reference[case]
    assert pt.format == "score-sde"
    x, t = ref["x"], ref["t"]
    network = np.asarray(score_sde_network_fn(pt, config(case))(x, t))
    score = np.asarray(score_sde_score_fn(pt, config(case))(x, t))
    assert rel_err(network, ref["model"]) < 1e-5
    late = t > 0.3
    assert rel_err(score[late], ref["score"][late]) < 1e-5
    assert rel_err(score, ref["score"]) < 5e-4


@pytest.mark.slow
def test_centered_ve_config_maps_to_the_undoubled_ve(reference):
    """With data.centered=True score_sde's NCSNpp skips its 2x - 1, so its score at x' = 2x - 1 is the
    uncentered network's score at x: the same weights read as VE(0.01, 50) on x' give the reference."""
    cfg = with_model("ve_ncsnpp_continuous")
    cfg["data"]["centered"] = True
    pt = load_pretrained(checkpoint("ve_ncsnpp_continuous"), config=cfg)
    assert (pt.process.sigma_min, pt.process.sigma_max) == pytest.approx((0.01, 50.0))
    ref = reference["ve_ncsnpp_continuous"]
    score = score_sde_score_fn(pt, cfg)(2 * ref["x"] - 1, ref["t"])
    assert rel_err(score, ref["score"]) < 1e-5


def test_vp_sigma_is_the_float64_one():
    """Our VP / sub-VP sigma(t) equals the float64 closed form where score_sde's float32 one cancels."""
    t = np.array([1e-3, 0.01, 0.5, 1.0])
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    vp, subvp = loaded("vp_ddpmpp_continuous").process, loaded("subvp_ddpmpp_continuous").process
    np.testing.assert_allclose(vp.sigma(jnp.asarray(t)), np.sqrt(-np.expm1(2 * log_alpha)), rtol=2e-6)
    np.testing.assert_allclose(subvp.sigma(jnp.asarray(t)), -np.expm1(2 * log_alpha), rtol=2e-6)


def test_processes_predictions_and_network_times():
    ve, vp = loaded("ve_ncsnpp_continuous"), loaded("vp_ddpmpp_continuous")
    subvp, ddpm = loaded("subvp_ddpmpp_continuous"), loaded("vp_ddpmpp_discrete")
    # VE on [0, 1] data with sigma in [0.01, 50] is VE(0.02, 100) on [-1, 1]; the network sees log sigma, gives -eps
    assert isinstance(ve.process, VE) and (ve.process.sigma_min, ve.process.sigma_max) == pytest.approx((0.02, 100))
    assert ve.prediction == "eps" and ve.output_sign == -1.0
    assert ve.config.embedding_type == "fourier" and ve.config.fir and ve.config.progressive_input == "residual"
    np.testing.assert_allclose(ve.time_input(jnp.array([0.0, 1.0])), np.log([0.01, 50.0]), rtol=1e-6)
    for pt, cls in ((vp, VP), (subvp, SubVP)):
        assert type(pt.process) is cls and (pt.process.beta_min, pt.process.beta_max) == pytest.approx((0.1, 20.0))
        assert pt.prediction == "eps" and pt.output_sign == 1.0 and pt.config.embedding_type == "positional"
        np.testing.assert_allclose(pt.time_input(jnp.array([0.5])), [499.5])
    assert isinstance(ddpm.process, DiscreteVP) and ddpm.prediction == "eps"
    betas = np.linspace(0.1 / 1000, 20 / 1000, 1000)
    alpha_bar = np.cumprod(1 - betas)
    np.testing.assert_allclose(ddpm.process.alpha(jnp.array([0.001, 0.5, 1.0])) ** 2, alpha_bar[[0, 499, 999]], 1e-5)
    np.testing.assert_allclose(ddpm.time_input(jnp.array([0.001, 1.0])), [0.0, 999.0], atol=1e-4)


def test_target_weights_differ_from_ema(reference):
    """The comparison can fail: optimizer.target (not params_ema) reproduces score_sde's target score
    and misses its EMA score by far more than the tolerance."""
    case = "ve_ncsnpp_continuous"
    ref = reference[case]
    late = ref["t"] > 0.3
    score = np.asarray(score_sde_score_fn(loaded(case, "target"), config(case))(ref["x"], ref["t"]))
    assert rel_err(score[late], ref["score_target"][late]) < 1e-5
    assert rel_err(score, ref["score"]) > 1e-2


def test_checkpoint_layout_and_detection(tmp_path):
    path = checkpoint("ve_ncsnpp_continuous")
    assert is_score_sde_checkpoint(path)
    for other in ("dit_tiny.pt", "edm_adm.pkl", "edm2_tiny.npz", "edm_ddpmpp.safetensors"):
        assert not is_score_sde_checkpoint(FIXTURES.parent / "pretrained" / other)
    state = serialization.msgpack_restore(path.read_bytes())
    assert {"step", "optimizer", "params_ema", "model_state", "ema_rate", "rng", "lr"} <= set(state)
    ema = read_score_sde_params(path)
    assert ema["Conv_0"]["kernel"].shape == (3, 3, 3, 4)  # flax HWIO, as written
    np.testing.assert_array_equal(
        read_score_sde_params(path, "target")["Conv_0"]["kernel"], state["optimizer"]["target"]["Conv_0"]["kernel"]
    )
    # a file with the parameter tree alone loads too, format inferred from the content
    alone = tmp_path / "params.msgpack"
    alone.write_bytes(serialization.msgpack_serialize(ema))
    pt = load_pretrained(alone, config=config("ve_ncsnpp_continuous"))
    ours = loaded("ve_ncsnpp_continuous")
    np.testing.assert_array_equal(pt.params["conv_out"]["kernel"], ours.params["conv_out"]["kernel"])
    with pytest.raises(ValueError, match="weights='target' needs a training state"):
        load_pretrained(alone, config=config("ve_ncsnpp_continuous"), weights="target")


def test_a_checkpoint_folder_gives_its_newest_step(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint_{step}").write_bytes(b"")
    (tmp_path / "checkpoint_x").write_bytes(b"")
    assert latest_score_sde_checkpoint(tmp_path) == tmp_path / "checkpoint_10"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no score_sde checkpoint_<step> file"):
        latest_score_sde_checkpoint(tmp_path / "empty")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_3").write_bytes(b"not read: an older step")
    shutil.copy(checkpoint("ve_ncsnpp_continuous"), run / "checkpoint_12")
    pt = load_pretrained(run, config=config("ve_ncsnpp_continuous"))  # the format inferred from the folder
    np.testing.assert_array_equal(
        pt.params["conv_out"]["kernel"], loaded("ve_ncsnpp_continuous").params["conv_out"]["kernel"]
    )


def test_unreadable_files_are_named(tmp_path):
    truncated = tmp_path / "checkpoint_1"
    truncated.write_bytes(checkpoint("ve_ncsnpp_continuous").read_bytes()[:5000])
    foreign = FIXTURES.parent / "pretrained" / "dit_tiny.pt"
    for path in (truncated, foreign):
        with pytest.raises(ValueError, match=f"{path.name}' is not a readable flax msgpack checkpoint"):
            load_pretrained(path, format="score-sde", config=config("ve_ncsnpp_continuous"))


def with_model(case: str, **changes) -> dict:
    cfg = json.loads(json.dumps(config(case)))
    cfg["model"].update(changes)
    return cfg


def test_wrong_hyper_parameters_name_the_parameter():
    path = checkpoint("ve_ncsnpp_continuous")
    with pytest.raises(
        ValueError,
        match=r"score_sde parameter GaussianFourierProjection_0/W has shape \(4,\), but the config gives \(128,\)",
    ):
        load_pretrained(path, format="score-sde", config="ve/cifar10_ncsnpp_continuous")
    with pytest.raises(
        ValueError,
        match=r"ResnetBlockBigGANpp_2/Conv_0/kernel has shape \(3, 3, 4, 8\), but the config gives \(3, 3, 4, 12\)",
    ):
        load_pretrained(path, config=with_model("ve_ncsnpp_continuous", ch_mult=[1, 3]))
    with pytest.raises(
        ValueError,
        match=r"ResnetBlockBigGANpp_2/Conv_0/kernel has shape \(3, 3, 4, 8\), but the config gives \(3, 3, 4, 4\)",
    ):
        load_pretrained(path, config=with_model("ve_ncsnpp_continuous", num_res_blocks=2))
    with pytest.raises(ValueError, match=r"\[.AttnBlockpp_1/GroupNorm_0/bias.*not used by the config"):
        load_pretrained(path, config=with_model("ve_ncsnpp_continuous", attn_resolutions=[]))
    with pytest.raises(ValueError, match="no module GaussianFourierProjection_0"):
        load_pretrained(
            checkpoint("vp_ddpmpp_continuous"), config=with_model("vp_ddpmpp_continuous", embedding_type="fourier")
        )


def test_unsupported_or_missing_configs_are_refused():
    path = checkpoint("ve_ncsnpp_continuous")
    with pytest.raises(ValueError, match="needs config="):
        load_pretrained(path, format="score-sde")
    with pytest.raises(ValueError, match="unknown score_sde config 've/cifar10_ncsnpp_continous'"):
        load_pretrained(path, config="ve/cifar10_ncsnpp_continous")
    with pytest.raises(ValueError, match="model.progressive='output_skip' is not supported"):
        load_pretrained(path, config=with_model("ve_ncsnpp_continuous", progressive="output_skip"))
    discrete_ve = with_model("ve_ncsnpp_continuous")
    discrete_ve["training"]["continuous"] = False
    with pytest.raises(ValueError, match="discrete VE"):
        load_pretrained(path, config=discrete_ve)
    uncentered = with_model("vp_ddpmpp_continuous")
    uncentered["data"]["centered"] = False
    with pytest.raises(ValueError, match="data.centered=False"):
        load_pretrained(checkpoint("vp_ddpmpp_continuous"), config=uncentered)
    with pytest.raises(ValueError, match="progressive_input='residual' with model.fir=False"):
        load_pretrained(path, config=with_model("ve_ncsnpp_continuous", fir=False))
    with pytest.raises(ValueError, match="training.sde=3 must be a string"):
        load_pretrained(path, config={**config("ve_ncsnpp_continuous"), "training": {"sde": 3, "continuous": True}})
    discrete_fourier = with_model("vp_ddpmpp_continuous", embedding_type="fourier")
    discrete_fourier["training"]["continuous"] = False
    with pytest.raises(ValueError, match="discrete VP chain with Fourier features"):
        load_pretrained(checkpoint("vp_ddpmpp_continuous"), config=discrete_fourier)
    with pytest.raises(ValueError, match="unknown score-sde weights 'last'"):
        load_pretrained(path, config=config("ve_ncsnpp_continuous"), weights="last")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nf'\]"):
        load_pretrained(path, config=config("ve_ncsnpp_continuous"), nf=4)


def test_config_may_be_score_sde_own_config_dict():
    ml_collections = pytest.importorskip("ml_collections")
    plain = config("ve_ncsnpp_continuous")
    assert score_sde_config(ml_collections.ConfigDict(plain)) == score_sde_config(plain)
    assert score_sde_config(plain)["model"]["ch_mult"] == (1, 2)  # lists (JSON, ml_collections) as tuples


SHRUNK = {"model": ("nf", "ch_mult", "num_res_blocks", "attn_resolutions"), "data": ("image_size",)}


@pytest.mark.parametrize("case", CASES)
def test_named_configs_are_score_sde_cifar10_ones(case):
    """Each fixture ran score_sde's own config file, shrunk: the named config of that file equals it
    in every field the reader uses but the shrunk sizes."""
    name = CONFIGS[case]["score_sde_config"].removeprefix("configs/").removesuffix(".py")
    assert len(SCORE_SDE_CONFIGS) == 12
    named, ran = score_sde_config(name), score_sde_config(config(case))
    for section, fields in SHRUNK.items():
        for field in fields:
            named[section][field] = ran[section][field]
    assert named == ran


@pytest.mark.slow
def test_readme_example_samples_a_loaded_score_sde_checkpoint():
    import helpers

    namespace = {}
    exec(helpers.readme_example("pretrained-score-sde"), namespace)
    out, pt = namespace["out"], namespace["pt"]
    assert out.samples.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(out.samples)))
    assert isinstance(pt.process, VE) and pt.process.sigma_max == pytest.approx(100.0)
