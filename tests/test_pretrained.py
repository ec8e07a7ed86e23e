"""Published checkpoints through `load_pretrained`, against the reference implementations' outputs.

The fixtures (tests/fixtures/pretrained/) are tiny random-weight networks of facebookresearch/DiT,
openai/guided-diffusion, NVlabs/edm and diffusers, with every parameter redrawn (zero-initialised
layers included), saved in each original format, plus the reference's outputs on fixed inputs; they
are written by experiments/pretrained/make_fixtures.py. Tests read the fixtures only (no torch).
"""

import dataclasses
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import models
from diffjax.denoisers import EDMPreconditioned
from diffjax.models import layers as L
from diffjax.models.pretrained import _module_tensors, ddpm_betas, load_pretrained
from diffjax.models.torch_files import load_module_pickle, load_torch_object, read_safetensors
from diffjax.processes import EDM, DiscreteVP
from diffjax.training import sharding as shard_lib

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
CASES = {
    # name: (file, options, format)
    "dit": ("dit_tiny.pt", dict(num_heads=2), "dit"),
    "adm_imagenet": ("adm_imagenet.pt", dict(image_size=8, num_head_channels=16), "adm"),
    "adm_cifar": ("adm_cifar.pt", dict(image_size=8, num_heads=2), "adm"),
    "edm_ddpmpp": ("edm_ddpmpp.safetensors", {}, "edm"),
    "edm_ncsnpp": ("edm_ncsnpp.pt", {}, "edm"),
    "diffusers_dit": ("diffusers_dit", {}, "diffusers-dit"),
}


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "reference_outputs.npz") as z:
        return dict(z)


# The default run compiles the two DiTs; the U-Nets (ADMs, DDPM++, NCSN++ with its stored frequencies
# and EDM label mapping) compile for longer and run with -m slow.
SLOW = {"adm_imagenet", "adm_cifar", "edm_ddpmpp", "edm_ncsnpp"}
_LOADED: dict = {}


def loaded(name):
    if name not in _LOADED:
        f, opts, _ = CASES[name]
        _LOADED[name] = load_pretrained(FIXTURES / f, **opts)
    return _LOADED[name]


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def _inputs(reference, name):
    y = reference.get(f"{name}/y")
    return (
        jnp.asarray(reference[f"{name}/x"]),
        jnp.asarray(reference[f"{name}/t"]),
        None if y is None else jnp.asarray(y),
    )


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_loaded_network_equals_the_reference(name, reference):
    pt = loaded(name)
    assert pt.format == CASES[name][2]
    x, t, y = _inputs(reference, name)
    out = jax.jit(pt.apply)(pt.params, x, t, y)
    assert out.shape == reference[f"{name}/out"].shape
    assert rel_rms(out, reference[f"{name}/out"]) < 1e-5


def test_what_each_format_is_returned_with():
    dit, edm = loaded("dit"), loaded("edm_ncsnpp")
    assert dit.learned_variance and dit.config.learn_sigma and dit.prediction == "eps"
    assert isinstance(dit.process, DiscreteVP) and dit.process.num_steps == 1000
    np.testing.assert_allclose(
        np.exp(np.asarray(dit.process.log_alpha_bar[1:], np.float64)),
        np.cumprod(1 - ddpm_betas("linear", 1000)),
        rtol=1e-5,
    )
    assert isinstance(edm.process, EDM) and edm.prediction == EDMPreconditioned(0.5)
    assert edm.config.class_embedding == "linear" and edm.config.embedding_type == "fourier"
    diffusers = loaded("diffusers_dit").config
    assert (diffusers.frequency_shift, diffusers.mlp_norm_eps) == (1, 1e-5)


@pytest.mark.slow
def test_adm_structure_is_read_from_the_keys():
    adm, cifar = loaded("adm_imagenet"), loaded("adm_cifar")
    assert adm.learned_variance and adm.config.num_classes == 3 and adm.config.resblock_updown
    assert adm.config.use_scale_shift_norm and not cifar.config.use_scale_shift_norm
    assert not cifar.learned_variance and not cifar.config.resblock_updown
    with pytest.raises(ValueError, match="attention_order"):
        load_pretrained(FIXTURES / "adm_cifar.pt", image_size=8, num_heads=2, attention_order="newest")


def test_network_takes_the_process_time():
    """DDPM networks embed the step index j of the chain's knot t = (j + 1) / N; a learned-variance
    network's output splits into the prediction and v."""
    pt = loaded("dit")
    j = jnp.array([0.0, 10.0, 999.0])
    np.testing.assert_allclose(pt.time_input((j + 1) / 1000), j, atol=1e-4)
    fake = lambda params, x, t, y: jnp.concatenate([x + t[:, None, None, None], -x], -1)  # noqa: E731
    stub = dataclasses.replace(pt, apply=fake, params={})
    x = jnp.ones((3, 8, 8, 4))
    mean, v = stub.variance_network()(x, (j + 1) / 1000)
    np.testing.assert_allclose(mean, x + j[:, None, None, None], atol=1e-4)
    np.testing.assert_allclose(v, -x)
    np.testing.assert_allclose(stub.network()(x, (j + 1) / 1000), mean)
    with pytest.raises(ValueError, match="no learned variance"):
        dataclasses.replace(stub, learned_variance=False).variance_network()


@pytest.mark.slow
def test_edm_checkpoint_gives_a_preconditioned_denoiser(reference):
    pt = loaded("edm_ddpmpp")
    x, c_noise, _ = _inputs(reference, "edm_ddpmpp")
    sigma = jnp.exp(4 * c_noise)
    sd = 0.5
    c_in, c_skip, c_out = (
        1 / jnp.sqrt(sigma**2 + sd**2),
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / jnp.sqrt(sigma**2 + sd**2),
    )
    x_noisy = x / c_in[:, None, None, None]  # so that the network sees exactly the fixture's x
    d = jax.jit(pt.denoiser().x0)(x_noisy, sigma)
    want = c_skip[:, None, None, None] * x_noisy + c_out[:, None, None, None] * reference["edm_ddpmpp/out"]
    assert rel_rms(d, want) < 1e-5


@pytest.mark.slow
def test_bfloat16_storage(reference):
    pt = load_pretrained(FIXTURES / "edm_ncsnpp.pt", param_dtype="bfloat16")
    rest = {k: v for k, v in pt.params.items() if k != "fourier"}
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(rest))
    assert pt.params["fourier"]["freqs"].dtype == jnp.float32  # 2 pi t w needs float32 for w ~ 16
    x, t, y = _inputs(reference, "edm_ncsnpp")
    # the fixture's weights are bfloat16 values, so storage loses nothing; compute stays float32
    assert rel_rms(jax.jit(pt.apply)(pt.params, x, t, y), reference["edm_ncsnpp/out"]) < 1e-5


def test_loading_onto_a_mesh(reference, monkeypatch):
    """The README's example: each parameter lands with the trainer's sharding (FSDP and tensor
    axes), and the sharded network computes what the reference computes."""
    import helpers

    monkeypatch.chdir(Path(__file__).parents[1])
    env: dict = {}
    exec(helpers.readme_example("pretrained-mesh"), env)
    pt, mesh = env["pt"], env["mesh"]
    rules = shard_lib.make_rules()
    want = shard_lib.param_shardings(pt.params, models.logical_partition_specs(pt.model), mesh, rules)
    assert jax.tree.map(lambda a: a.sharding.spec, pt.params) == jax.tree.map(lambda s: s.spec, want)
    split = [a for a in jax.tree.leaves(pt.params) if a.addressable_shards[0].data.size < a.size]
    assert split, "no parameter of the DiT was split over the mesh"
    x, t, y = _inputs(reference, "dit")
    assert rel_rms(jax.jit(pt.apply)(pt.params, x, t, y), reference["dit/out"]) < 1e-5


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="image_size"):
        load_pretrained(FIXTURES / "adm_cifar.pt")
    with pytest.raises(ValueError, match="unknown option"):
        load_pretrained(FIXTURES / "edm_ddpmpp.safetensors", image_size=8)
    with pytest.raises(ValueError, match="format='ckpt' is invalid"):
        load_pretrained(FIXTURES / "dit_tiny.pt", format="ckpt")
    with pytest.raises(ValueError, match="num_heads"):
        load_pretrained(FIXTURES / "dit_tiny.pt")
    with pytest.raises(ValueError, match="num_heads=3 is invalid"):
        load_pretrained(FIXTURES / "adm_cifar.pt", image_size=8, num_heads=3)
    other = tmp_path / "other.safetensors"
    _write_safetensors(other, {"encoder.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"other.safetensors.*known formats.*dit"):
        load_pretrained(other)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ValueError, match="UNet2DConditionModel.*not supported"):
        load_pretrained(folder)


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_pretrained(evil)


def test_training_checkpoint_contents_are_plain_data():
    obj = load_torch_object(FIXTURES / "dit_tiny.pt")  # DiT's training checkpoints: model, ema, args
    assert set(obj) == {"model", "ema", "args"} and obj["args"].model == "tiny"
    assert obj["ema"]["x_embedder.proj.weight"].shape == (32, 4, 2, 2)


def _write_safetensors(path, arrays):
    import json
    import struct

    header, blobs, offset = {}, [], 0
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_reader(tmp_path):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([-1, 7], np.int64)
    _write_safetensors(tmp_path / "w.safetensors", {"a": a, "b": b})
    got = read_safetensors(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_fourier_frequencies_are_stored_and_get_no_gradient():
    feats = L.FourierFeatures(4, scale=16.0, rngs=nnx.Rngs(0))
    freqs = np.asarray(feats.freqs[...])
    assert freqs.shape == (4,) and np.std(freqs) > 1.0
    t = jnp.array([0.3, -1.2])
    want = np.concatenate([np.sin(2 * np.pi * t[:, None] * freqs), np.cos(2 * np.pi * t[:, None] * freqs)], -1)
    np.testing.assert_allclose(feats(t), want, atol=1e-4)  # arguments up to ~ 300 rad in float32
    graphdef, params = nnx.split(feats, nnx.Param)
    grad = jax.grad(lambda p: nnx.merge(graphdef, p)(t).sum())(params)
    assert float(jnp.abs(grad["freqs"][...]).max()) == 0.0


def test_edm_label_mapping_config():
    cfg = models.get_config("NCSN++-cifar10-edm", num_classes=10)
    assert cfg.class_embedding == "linear"
    assert models.get_config("NCSN++-cifar10", num_classes=10).class_embedding == "table"
    with pytest.raises(ValueError, match="class_embedding"):
        models.get_config("DDPM++-cifar10", class_embedding="onehot")


@pytest.mark.slow
def test_readme_example_samples_a_loaded_dit():
    import helpers

    namespace = {}
    exec(helpers.readme_example("pretrained"), namespace)
    out = namespace["out"]
    assert out.samples.shape == (2, 8, 8, 4) and out.nfe == 25 and bool(jnp.all(jnp.isfinite(out.samples)))


@pytest.fixture(scope="module")
def ddpm_reference():
    with np.load(FIXTURES / "reference_diffusers_ddpm.npz") as z:
        return dict(z)


def test_diffusers_unet2d_equals_the_reference(ddpm_reference):
    """google/ddpm-cifar10-32's architecture (tiny, random weights) from a DDPMPipeline folder; the
    scheduler config (cosine betas, v-prediction) gives the process and the prediction."""
    pt = load_pretrained(FIXTURES / "diffusers_ddpm")
    assert pt.format == "diffusers-unet" and pt.prediction == "v" and not pt.learned_variance
    assert (pt.config.norm_eps, tuple(pt.config.downsample_pad), pt.config.frequency_shift) == (1e-6, (0, 1), 1)
    np.testing.assert_allclose(
        np.exp(np.asarray(pt.process.log_alpha_bar[1:], np.float64)), ddpm_reference["alphas_cumprod"], rtol=1e-4
    )
    x, j = jnp.asarray(ddpm_reference["x"]), jnp.asarray(ddpm_reference["t"], jnp.float32)
    out = jax.jit(pt.network())(x, (j + 1) / 1000)  # the chain's knot t = (j + 1) / N is step j
    assert rel_rms(out, ddpm_reference["out"]) < 1e-4
    unet_only = load_pretrained(FIXTURES / "diffusers_ddpm" / "unet")  # the scheduler found in ../scheduler
    assert unet_only.prediction == "v" and unet_only.config == pt.config


def test_diffusers_unet2d_options_we_lack_are_named(tmp_path):
    import json
    import shutil

    folder = tmp_path / "unet"
    shutil.copytree(FIXTURES / "diffusers_ddpm" / "unet", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, time_embedding_type="fourier")))
    with pytest.raises(ValueError, match="time_embedding_type='fourier' is not supported"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, up_block_types=["UpBlock2D", "AttnUpBlock2D"])))
    with pytest.raises(ValueError, match="attention at different levels"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "sigmoid"}))
    with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not supported"):
        load_pretrained(folder)


@pytest.fixture(scope="module")
def dhariwal_state_dict(tmp_path_factory):
    """EDM's DhariwalUNet of the edm_adm.pkl snapshot saved as a state dict (EDMPrecond's keys)."""
    snapshot = load_module_pickle(FIXTURES / "edm_adm.pkl")["ema"]
    sd = {f"model.{k}": v for k, v in _module_tensors(snapshot._modules["model"]).items()}
    path = tmp_path_factory.mktemp("dhariwal") / "adm.safetensors"
    _write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
    return path


def test_edm_dhariwal_unet_state_dict_needs_its_head_width(dhariwal_state_dict):
    """A state dict does not record the head width: an option, 64 by default as in EDM."""
    with pytest.raises(ValueError, match="num_head_channels=64 is invalid"):
        load_pretrained(dhariwal_state_dict)


@pytest.mark.slow
def test_edm_dhariwal_unet_state_dict_loads_like_its_snapshot(dhariwal_state_dict):
    pt = load_pretrained(dhariwal_state_dict, num_head_channels=4)
    want = load_pretrained(FIXTURES / "edm_adm.pkl")
    assert pt.format == "edm" and pt.config == want.config and isinstance(pt.process, EDM)
    jax.tree.map(np.testing.assert_array_equal, pt.params, want.params)
