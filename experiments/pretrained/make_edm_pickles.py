"""Writes tests/fixtures/pretrained/edm_*.pkl: tiny random-weight NVlabs/edm networks pickled the way
EDM's training loop writes network-snapshot-*.pkl (a dict of ema / loss_fn / augment_pipe /
dataset_kwargs, the modules through EDM's `torch_utils.persistence`), plus the reference outputs on
fixed inputs in reference_edm_pickles.npz (float32, CPU).

Reference: NVlabs/edm at 008a4e5, read from a local checkout (none of its code is committed: every
persistent class's embedded source is replaced by a one-line placeholder before pickling, so the
fixtures hold the format and the numbers only; the loader never reads that source anyway).

    python -m experiments.pretrained.make_edm_pickles --edm REPO

The three snapshots cover the three networks and the three preconditionings:
    edm_vp_ddpmpp.pkl    VPPrecond(SongUNet DDPM++), unconditional, VPLoss
    edm_ve_ncsnpp.pkl    VEPrecond(SongUNet NCSN++), 3 classes, VELoss
    edm_adm.pkl          EDMPrecond(DhariwalUNet), 3 classes, EDMLoss and an AugmentPipe
DhariwalUNet's attention has out_channels // 64 heads, which would need 64-channel levels (MBs of
weights); its attention blocks are rebuilt after construction with channels_per_head=4 instead (the
pickle records each block's num_heads, and the loader reads it from there).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pickle
from pathlib import Path

import numpy as np

from experiments.pretrained.make_fixtures import OUT, inputs, load_package, nhwc, perturb

PLACEHOLDER = "# NVlabs/edm source omitted from this fixture (the loader never reads it)\n"


PERSISTENT: list[type] = []  # EDM's persistent classes, filled in main()


def snapshot(torch, net, loss_fn, augment_pipe, path: Path) -> None:
    """As training/training_loop.py: deep copies in eval mode without gradients, then pickle.dump
    (with each persistent class's embedded source replaced by PLACEHOLDER while pickling)."""
    data = dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(path="cifar10.zip", xflip=0))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
    sources = [cls._orig_module_src for cls in PERSISTENT]
    try:
        for cls in PERSISTENT:
            cls._orig_module_src = PLACEHOLDER
        with open(path, "wb") as f:
            pickle.dump(data, f)
    finally:
        for cls, src in zip(PERSISTENT, sources):
            cls._orig_module_src = src


def reference(torch, net, x, sigma, labels, y, c_noise) -> dict:
    with torch.no_grad():
        raw = net.model(x, c_noise, labels)
        d = net(x, sigma, labels)
    out = dict(x=nhwc(x), sigma=sigma.numpy(), c_noise=c_noise.numpy(), raw=nhwc(raw), denoised=nhwc(d))
    if y is not None:
        out["y"] = y.numpy()
    return out


SONG = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def make_vp(torch, networks, loss):
    net = networks.VPPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", **SONG).eval()
    perturb(torch, net, 21)
    x = inputs(torch, 3, 8, 31)
    t = torch.tensor([0.05, 0.6])
    sigma = net.sigma(t)
    c_noise = (net.M - 1) * net.sigma_inv(sigma)
    snapshot(torch, net, loss.VPLoss(), None, OUT / "edm_vp_ddpmpp.pkl")
    return dict(reference(torch, net, x, sigma, None, None, c_noise), t=t.numpy())


def make_ve(torch, networks, loss):
    song = dict(SONG, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual")
    net = networks.VEPrecond(
        img_resolution=8, img_channels=3, label_dim=3, model_type="SongUNet", resample_filter=[1, 3, 3, 1], **song
    ).eval()
    perturb(torch, net, 22)
    x = inputs(torch, 3, 8, 32)
    t = torch.tensor([0.2, 0.9])
    sigma = net.sigma_min * (net.sigma_max / net.sigma_min) ** t
    y = torch.tensor([2, 3])  # 3 = the null class (zero label vector)
    labels = torch.nn.functional.one_hot(y, 4)[:, :3].float()
    snapshot(torch, net, loss.VELoss(), None, OUT / "edm_ve_ncsnpp.pkl")
    return dict(reference(torch, net, x * 3, sigma, labels, y, (0.5 * sigma).log()), t=t.numpy())


def make_adm(torch, networks, loss, augment):
    net = networks.EDMPrecond(
        img_resolution=8,
        img_channels=3,
        label_dim=3,
        model_type="DhariwalUNet",
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
        augment_dim=9,
    ).eval()
    for blocks in (net.model.enc, net.model.dec):
        for key, block in blocks.items():
            if key.startswith("4x4_block") or key.endswith("_in0"):  # rebuilt with 4-channel heads
                blocks[key] = networks.UNetBlock(**dict(block.init_kwargs, attention=True, channels_per_head=4))
    perturb(torch, net, 23)
    x = inputs(torch, 3, 8, 33)
    sigma = torch.tensor([0.3, 4.0])
    y = torch.tensor([0, 2])
    labels = torch.nn.functional.one_hot(y, 3).float()
    pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    snapshot(torch, net, loss.EDMLoss(), pipe, OUT / "edm_adm.pkl")
    return reference(torch, net, x * (sigma[:, None, None, None] ** 2 + 0.25).sqrt(), sigma, labels, y, sigma.log() / 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    load_package("dnnlib", args.edm / "dnnlib")
    load_package("torch_utils", args.edm / "torch_utils")
    load_package("training", args.edm / "training")
    networks = importlib.import_module("training.networks")
    loss = importlib.import_module("training.loss")
    augment = importlib.import_module("training.augment")
    for module in (networks, loss, augment):
        PERSISTENT.extend(v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "_orig_module_src"))
    refs = {
        "edm_vp_ddpmpp": make_vp(torch, networks, loss),
        "edm_ve_ncsnpp": make_ve(torch, networks, loss),
        "edm_adm": make_adm(torch, networks, loss, augment),
    }
    arrays = {f"{name}/{k}": np.asarray(v) for name, r in refs.items() for k, v in r.items()}
    np.savez_compressed(OUT / "reference_edm_pickles.npz", **arrays)
    for name in refs:
        print(f"{name}.pkl: {(OUT / f'{name}.pkl').stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
