"""Writes tests/fixtures/pretrained/edm2_tiny.pkl: a tiny random-weight NVlabs/edm2 network pickled the
way EDM2's training loop writes network-snapshot-*.pkl (a dnnlib.EasyDict of encoder / dataset_kwargs /
loss_fn / ema, the network in float16, through EDM2's `torch_utils.persistence`), plus EDM2's outputs
on fixed inputs in reference_edm2.npz (float32, CPU: EDM2 computes in float32 from the float16
weights there). For the EDM2 loader: the unpickler reads it today; the network is another module's.

Reference: NVlabs/edm2 at 4bf8162, read from a local checkout (none of its code is committed: each
persistent class's embedded source is replaced by a placeholder while pickling).

    python -m experiments.pretrained.make_edm2_pickle --edm2 REPO
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pickle
from pathlib import Path

import numpy as np

from experiments.pretrained.make_edm_pickles import PLACEHOLDER
from experiments.pretrained.make_fixtures import OUT, inputs, load_package, nhwc, perturb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    dnnlib = load_package("dnnlib", args.edm2 / "dnnlib")
    load_package("torch_utils", args.edm2 / "torch_utils")
    load_package("training", args.edm2 / "training")
    networks = importlib.import_module("training.networks_edm2")
    encoders = importlib.import_module("training.encoders")
    loop = importlib.import_module("training.training_loop")
    net = networks.Precond(
        img_resolution=8,
        img_channels=4,
        label_dim=3,
        logvar_channels=8,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=4,
    ).eval()
    perturb(torch, net, 24)
    data = dnnlib.EasyDict(
        encoder=encoders.StabilityVAEEncoder(),
        dataset_kwargs=dnnlib.EasyDict(path="img512-sd.zip", use_labels=True),
        loss_fn=loop.EDM2Loss(),
    )
    data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    x = inputs(torch, 4, 8, 34)
    sigma = torch.tensor([0.4, 3.0])
    y = torch.tensor([1, 2])
    labels = torch.nn.functional.one_hot(y, 3).float()
    denoised, logvar = data.ema(x, sigma, labels, return_logvar=True)
    c_noise = sigma.log() / 4
    raw = data.ema.unet(x / (sigma[:, None, None, None] ** 2 + 0.25).sqrt(), c_noise, labels)
    persistent = [
        v
        for m in (networks, encoders, loop)
        for v in vars(m).values()
        if isinstance(v, type) and hasattr(v, "_orig_module_src")
    ]
    sources = [cls._orig_module_src for cls in persistent]
    try:
        for cls in persistent:
            cls._orig_module_src = PLACEHOLDER
        with open(OUT / "edm2_tiny.pkl", "wb") as f:
            pickle.dump(data, f)
    finally:
        for cls, src in zip(persistent, sources):
            cls._orig_module_src = src
    np.savez_compressed(
        OUT / "reference_edm2.npz",
        x=nhwc(x),
        sigma=sigma.numpy(),
        y=y.numpy(),
        c_noise=c_noise.numpy(),
        raw=nhwc(raw),
        denoised=nhwc(denoised),
        logvar=logvar.numpy().reshape(-1),
    )
    print(f"edm2_tiny.pkl: {(OUT / 'edm2_tiny.pkl').stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
