"""NVlabs/edm network snapshots (.pkl) through `load_pretrained`, read without torch and without
running pickled code, against EDM's own outputs.

The fixtures (tests/fixtures/pretrained/edm_*.pkl, reference_edm_pickles.npz) are tiny random-weight
networks pickled the way EDM's training loop does, written by experiments/pretrained/make_edm_pickles.py:
VPPrecond(DDPM++), VEPrecond(NCSN++, 3 classes), EDMPrecond(DhariwalUNet, 3 classes). The reference
output compared is the preconditioned denoiser D(x; sigma) (so the process, the prediction and the
network's time input are checked with the weights); the raw network F is compared as well.
"""

import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.denoisers import EDMPreconditioned
from diffjax.models import edm2
from diffjax.models.pretrained import load_pretrained
from diffjax.models.torch_files import PickledObject, load_module_pickle
from diffjax.processes import EDM, VE, VP

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
CASES = ("edm_adm", "edm_vp_ddpmpp", "edm_ve_ncsnpp")
_LOADED: dict = {}


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "reference_edm_pickles.npz") as z:
        return {name: {k.split("/")[1]: z[k] for k in z.files if k.startswith(name + "/")} for name in CASES}


def loaded(name):
    if name not in _LOADED:
        _LOADED[name] = load_pretrained(FIXTURES / f"{name}.pkl")
    return _LOADED[name]


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.mark.parametrize(
    "name", ["edm_adm", *(pytest.param(n, marks=pytest.mark.slow) for n in ("edm_vp_ddpmpp", "edm_ve_ncsnpp"))]
)
def test_snapshot_denoises_like_edm(name, reference):
    """D(x; sigma) of EDM's wrapper from our process' time t (sigma(t) / alpha(t) = EDM's sigma) and
    x_t = alpha(t) x, and the raw network F(x; c_noise)."""
    pt, ref = loaded(name), reference[name]
    y = jnp.asarray(ref["y"]) if "y" in ref else None
    t = jnp.asarray(ref["t"] if "t" in ref else ref["sigma"])  # EDM's own process: t = sigma
    np.testing.assert_allclose(pt.process.sigma(t) / pt.process.alpha(t), ref["sigma"], rtol=1e-5)
    x_t = jnp.asarray(ref["x"]) * pt.process.alpha(t)[:, None, None, None]

    @jax.jit
    def both(params):
        raw = pt.apply(params, jnp.asarray(ref["x"]), jnp.asarray(ref["c_noise"]), y)
        return raw, pt.denoiser(y, params).x0(x_t, t)

    raw, denoised = both(pt.params)
    assert rel_rms(raw, ref["raw"]) < 1e-4
    assert rel_rms(denoised, ref["denoised"]) < 1e-4


def test_snapshots_are_read_with_their_preconditioning():
    adm, vp, ve = (loaded(n) for n in CASES)
    assert adm.format == vp.format == ve.format == "edm-pkl"
    assert isinstance(adm.process, EDM) and adm.prediction == EDMPreconditioned(0.5)
    assert adm.config.num_classes == 3 and adm.config.num_head_channels == 4 and adm.config.min_group_channels == 4
    assert isinstance(vp.process, VP) and vp.prediction == "eps" and vp.config.num_classes == 0
    assert (vp.process.beta_min, vp.process.beta_max, vp.process.t_min) == pytest.approx((0.1, 20.0, 1e-5))
    np.testing.assert_allclose(vp.time_input(jnp.array([0.5])), [499.5])
    assert isinstance(ve.process, VE) and ve.prediction == "eps" and ve.output_sign == -1.0
    assert (ve.process.sigma_min, ve.process.sigma_max) == pytest.approx((0.02, 100.0))
    assert ve.config.embedding_type == "fourier" and ve.config.num_classes == 3
    np.testing.assert_allclose(ve.time_input(jnp.array([1.0])), [np.log(50.0)], rtol=1e-6)


def test_snapshot_contents_are_plain_data():
    snap = load_module_pickle(FIXTURES / "edm_adm.pkl")
    assert set(snap) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert isinstance(snap["ema"], PickledObject) and snap["ema"].class_name == "EDMPrecond"
    assert snap["ema"]._init_kwargs["model_type"] == "DhariwalUNet"
    assert snap["loss_fn"].class_name == "EDMLoss" and snap["loss_fn"].P_mean == -1.2
    conv = snap["ema"]._modules["model"]._modules["out_conv"]
    assert isinstance(conv._parameters["weight"], np.ndarray) and conv._parameters["weight"].shape == (3, 8, 3, 3)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unknown_globals_are_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "network-snapshot-000000.pkl"
    evil.write_bytes(pickle.dumps({"ema": _Evil(marker)}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"network-snapshot-000000\.pkl.*refusing.*system"):
        load_pretrained(evil)
    assert not marker.exists()
    old = tmp_path / "old.pkl"  # protocol 2, GLOBAL opcode
    old.write_bytes(b"\x80\x02cbuiltins\neval\n(X\x05\x00\x00\x001 + 1tR.")
    with pytest.raises(pickle.UnpicklingError, match=r"old\.pkl.*builtins\.eval"):
        load_pretrained(old)


def test_persistent_class_source_is_never_run(tmp_path):
    """EDM pickles carry each class's source code; the reader keeps the class name and state only."""
    marker = tmp_path / "ran"
    meta = dict(type="class", version=4, module_src=f"open({str(marker)!r}, 'w')", class_name="Net", state={"a": 1})
    body = pickle.dumps(meta, protocol=2)[2:-1]
    path = tmp_path / "net.pkl"
    path.write_bytes(b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n" + body + b"\x85R.")
    obj = load_module_pickle(path)
    assert isinstance(obj, PickledObject) and obj.class_name == "Net" and obj.a == 1
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"net\.pkl.*not an EDM network snapshot.*Net"):
        load_pretrained(path)


def test_edm2_snapshot_is_plain_data():
    """EDM2's snapshots (float16 network, an EasyDict with the latent encoder's numpy statistics) are
    read by the same unpickler; reference_edm2.npz holds EDM2's outputs for the EDM2 loader."""
    snap = load_module_pickle(FIXTURES / "edm2_tiny.pkl")
    assert set(snap) == {"encoder", "dataset_kwargs", "loss_fn", "ema"} and type(snap) is dict
    assert snap["ema"].class_name == "Precond" and snap["ema"]._modules["unet"].class_name == "UNet"
    fourier = snap["ema"]._modules["unet"]._modules["emb_fourier"]
    assert fourier._buffers["freqs"].dtype == np.float16 and fourier._buffers["freqs"].shape == (8,)
    encoder = snap["encoder"]  # scale = final_std / raw_std, bias = final_mean - raw_mean * scale
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
    assert type(encoder.scale) is np.ndarray and encoder.scale.dtype == np.float32
    np.testing.assert_array_equal(encoder.scale, scale)
    np.testing.assert_array_equal(encoder.bias, np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale)


def test_edm2_snapshot_denoises_like_edm2():
    """The float16 EDM2 snapshot through load_pretrained: the raw U-Net, D(x; sigma) with the
    pickle's sigma_data, and the log-variance head, against EDM2's own outputs (<= 1e-4; the
    reference ran in float16-stored weights cast to float32 here as there)."""
    pt = load_pretrained(FIXTURES / "edm2_tiny.pkl")
    ref = np.load(FIXTURES / "reference_edm2.npz")
    assert pt.format == "edm-pkl" and pt.config.num_classes == 3 and pt.config.channel_mult == (1, 2)
    y, sigma = jnp.asarray(ref["y"], jnp.int32), jnp.asarray(ref["sigma"])
    c_in = 1 / jnp.sqrt(0.25 + sigma**2)[:, None, None, None]
    raw = pt.apply(pt.params, jnp.asarray(ref["x"]) * c_in, jnp.asarray(ref["c_noise"]), y)
    assert rel_rms(raw, ref["raw"]) < 1e-4
    assert rel_rms(pt.denoiser(y).x0(jnp.asarray(ref["x"]), sigma), ref["denoised"]) < 1e-4
    logvar = edm2.logvar_from_params(pt.params, jnp.asarray(ref["c_noise"]))
    np.testing.assert_allclose(logvar, ref["logvar"], rtol=1e-4, atol=1e-5)


def test_numpy_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"objects\.pkl.*numpy dtype object"):
        load_module_pickle(path)
    path.write_bytes(pickle.dumps({"a": np.arange(3.0)}, protocol=4))
    np.testing.assert_array_equal(load_module_pickle(path)["a"], np.arange(3.0))


@pytest.mark.slow
def test_readme_example_samples_a_loaded_edm_snapshot():
    import helpers

    namespace = {}
    exec(helpers.readme_example("pretrained-edm"), namespace)
    out = namespace["out"]
    assert out.samples.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(out.samples)))
    assert isinstance(namespace["pt"].process, VP)
