"""Writes tests/fixtures/pretrained/edm2_tiny.npz: a tiny random-weight EDM2 network (the reference
`training.networks_edm2.Precond`, float32, CPU) as its state dict (torch names and layouts) with
the reference's outputs on fixed inputs: the raw U-Net output F(c_in x; c_noise, labels), the
preconditioned D(x; sigma) and the log-variance u(sigma).

Reference (read from a local checkout; none of its code is committed here):

    NVlabs/edm2    4bf8162 (training/networks_edm2.py, torch_utils/, dnnlib/)

Every learned gain (zero at initialisation in the reference) is redrawn so that no layer is skipped
by the comparison. Run with torch installed:

    python experiments/pretrained/make_edm2_fixture.py --edm2 REPO
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pretrained"
COMMIT = "4bf8162"
# The fixture's network: two levels (8x8, 4x4), attention at 4x4, 5 classes, 3 channels.
NETWORK = dict(
    img_resolution=8,
    img_channels=3,
    label_dim=5,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=8,
    logvar_channels=8,
    use_fp16=False,
)

# Published sizes whose state-dict entry counts (parameters and Fourier buffers) are recorded.
PRESET_SIZES = {"EDM2-img512-xs": (64, 4, 128), "EDM2-img512-xxl": (64, 4, 448), "EDM2-img64-s": (64, 3, 192)}


def _sibling(name: str):
    """experiments/pretrained/<name>.py as a module (sys.path untouched)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2", type=Path, required=True, help="a checkout of NVlabs/edm2")
    args = ap.parse_args()
    import torch

    fixtures = _sibling("make_fixtures")
    torch.set_grad_enabled(False)
    torch.manual_seed(0)  # the Fourier buffers are drawn at construction
    for package in ("dnnlib", "torch_utils", "training"):
        fixtures.load_package(package, args.edm2 / package)
    networks = importlib.import_module("training.networks_edm2")
    net = networks.Precond(**NETWORK).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if p.ndim == 0:  # emb_gain, out_gain: zero-initialised
            p.copy_(0.5 + 0.5 * torch.rand((), generator=g))

    batch = 4
    x = torch.randn(batch, NETWORK["img_channels"], 8, 8, generator=g)
    sigma = torch.tensor([0.02, 0.4, 3.0, 60.0])
    x = x * (0.5**2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
    y = torch.tensor([0, 4, 2, NETWORK["label_dim"]])  # label_dim = the null class (a zero label vector)
    labels = torch.nn.functional.one_hot(y, NETWORK["label_dim"] + 1)[:, :-1].float()
    c_in = 1 / (0.5**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    raw = net.unet(c_in.reshape(-1, 1, 1, 1) * x, c_noise, labels)
    denoised, logvar = net(x, sigma, labels, return_logvar=True)

    arrays = {f"state/{k}": v.numpy() for k, v in net.state_dict().items()}
    for name, (resolution, channels, width) in PRESET_SIZES.items():  # built on the meta device: no memory
        with torch.device("meta"):
            preset = networks.Precond(resolution, channels, 1000, model_channels=width)
        arrays[f"state_size/{name}"] = np.asarray(sum(v.numel() for v in preset.state_dict().values()))
    arrays.update(
        x=fixtures.nhwc(x),
        sigma=sigma.numpy(),
        y=y.numpy(),
        raw=fixtures.nhwc(raw),
        denoised=fixtures.nhwc(denoised),
        logvar=logvar.reshape(-1).numpy(),
        network=np.asarray(json.dumps(NETWORK)),
        commit=np.asarray(COMMIT),
        torch=np.asarray(torch.__version__),
    )
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "edm2_tiny.npz", **arrays)
    print(f"wrote {OUT / 'edm2_tiny.npz'} ({(OUT / 'edm2_tiny.npz').stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
