"""Writes tests/fixtures/pretrained/: tiny random-weight checkpoints in each published format plus the
reference implementation's outputs on fixed inputs (float32, CPU).

References (read from local clones at these commits; none of their code is committed here):

    facebookresearch/DiT        ed81ce2 (models.py; needs timm, imported from --timm)
    openai/guided-diffusion     22e0df8 (guided_diffusion/unet.py)
    NVlabs/edm                  008a4e5 (training/networks.py)
    diffusers                   the installed package (peers extra)

Every parameter is redrawn (zero-initialised layers included) so that no layer is skipped by the
comparison. Run with the peers extra installed:

    python experiments/pretrained/make_fixtures.py --dit REPO --guided-diffusion REPO --edm REPO --timm DIR

where each REPO is a checkout (or a folder with the files above) and DIR holds the `timm` package
(`pip install --target DIR timm --no-deps`). torchvision is not needed: timm's imports of it are
answered by empty stand-ins (DiT uses none of it).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pretrained"
COMMITS = {"dit": "ed81ce2", "guided-diffusion": "22e0df8", "edm": "008a4e5"}


def load_package(name: str, directory: Path):
    """Import the package `name` from `directory` (registered in sys.modules, sys.path untouched)."""
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_module(name: str, file: Path):
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Dummy(type):
    def __getattr__(cls, attr):
        return _Dummy(attr, (), {})


def _stand_in(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Dummy(attr, (), {})


class _NoTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import torchvision...` with empty modules (timm imports it; DiT never calls it)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _stand_in
        return module

    def exec_module(self, module):
        pass


def perturb(torch, module, seed: int, skip=("pos_embed",)):
    """Redraw every parameter: weights N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def round_to_bfloat16(torch, module):
    """Round every float parameter and buffer to bfloat16 values (kept in float32): the checkpoint is
    then saved in bfloat16 at half the size and loads to exactly the weights the reference used."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())


def bf16_state_dict(torch, module) -> dict:
    return {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()
    }


def nhwc(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))


def inputs(torch, c: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, size, size, generator=g)


def make_dit(torch, dit_models):
    net = dit_models.DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5
    ).eval()
    perturb(torch, net, 1)
    x, t, y = inputs(torch, 4, 8, 11), torch.tensor([10.0, 731.0]), torch.tensor([3, 5])  # 5: the null class
    with torch.no_grad():
        out = net(x, t, y)
    torch.save(
        {"model": net.state_dict(), "ema": net.state_dict(), "args": argparse.Namespace(model="tiny")},
        OUT / "dit_tiny.pt",
    )
    return dict(x=nhwc(x), t=t.numpy(), y=y.numpy(), out=nhwc(out))


def make_adm(torch, unet, variant: str):
    if variant == "imagenet":  # ADM-style: AdaGN, resample in res blocks, class labels, heads of 16 channels
        kw = dict(
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 1),
            num_classes=3,
            num_head_channels=16,
            use_scale_shift_norm=True,
            resblock_updown=True,
            out_channels=6,
        )
    else:  # improved-DDPM CIFAR style: plain resamplers with convs, bias time embedding, 2 heads, unconditional
        kw = dict(
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 1),
            num_heads=2,
            use_scale_shift_norm=False,
            resblock_updown=False,
            out_channels=3,
        )
    net = unet.UNetModel(image_size=8, in_channels=3, model_channels=32, dropout=0.0, **kw).eval()
    perturb(torch, net, 2)
    round_to_bfloat16(torch, net)
    x, t = inputs(torch, 3, 8, 12), torch.tensor([3.0, 900.0])
    y = torch.tensor([0, 2]) if variant == "imagenet" else None
    with torch.no_grad():
        out = net(x, t, y)
    torch.save(bf16_state_dict(torch, net), OUT / f"adm_{variant}.pt")
    res = dict(x=nhwc(x), t=t.numpy(), out=nhwc(out))
    if y is not None:
        res["y"] = y.numpy()
    return res


def make_edm(torch, networks, kind: str, save):
    common = dict(
        img_resolution=8,
        in_channels=3,
        out_channels=3,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
    )
    if kind == "ncsnpp":
        net = networks.SongUNet(
            embedding_type="fourier",
            channel_mult_noise=2,
            encoder_type="residual",
            resample_filter=[1, 3, 3, 1],
            label_dim=3,
            **common,
        )
    else:
        net = networks.SongUNet(
            embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=[1, 1], **common
        )
    net.eval()
    perturb(torch, net, 3)
    round_to_bfloat16(torch, net)
    x, c_noise = inputs(torch, 3, 8, 13), torch.tensor([-0.7, 0.9])
    y = torch.tensor([1, 3]) if kind == "ncsnpp" else None  # 3 = the null class (zero label vector)
    labels = torch.nn.functional.one_hot(y, 4)[:, :3].float() if y is not None else None
    with torch.no_grad():
        out = net(x, c_noise, labels)
    save({f"model.{k}": v for k, v in bf16_state_dict(torch, net).items()}, kind)
    res = dict(x=nhwc(x), t=c_noise.numpy(), out=nhwc(out))
    if y is not None:
        res["y"] = y.numpy()
    return res


def make_diffusers_dit(torch):
    from diffusers import DiTTransformer2DModel

    net = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
    ).eval()
    perturb(torch, net, 4)
    with torch.no_grad():  # diffusers keeps one time/label embedding per block; converted DiTs share one
        first = net.transformer_blocks[0].norm1.emb
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    x, t, y = inputs(torch, 4, 8, 14), torch.tensor([10.0, 731.0]), torch.tensor([3, 5])
    with torch.no_grad():
        out = net(x, timestep=t, class_labels=y).sample
    net.save_pretrained(OUT / "diffusers_dit", safe_serialization=True)
    return dict(x=nhwc(x), t=t.numpy(), y=y.numpy(), out=nhwc(out))


def make_diffusers_vae(torch):
    from diffusers import AutoencoderKL

    net = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    perturb(torch, net, 5)
    x = torch.tanh(inputs(torch, 3, 16, 15))
    z = inputs(torch, 4, 8, 16)
    with torch.no_grad():
        posterior = net.encode(x).latent_dist
        decoded = net.decode(z).sample
    net.save_pretrained(OUT / "diffusers_vae", safe_serialization=True)
    return dict(x=nhwc(x), mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar), z=nhwc(z), decoded=nhwc(decoded))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit", type=Path, required=True)
    ap.add_argument("--guided-diffusion", type=Path, required=True)
    ap.add_argument("--edm", type=Path, required=True)
    ap.add_argument("--timm", type=Path, required=True)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    torch.manual_seed(0)  # buffers drawn at construction (NCSN++ frequencies)
    OUT.mkdir(parents=True, exist_ok=True)
    sys.meta_path.insert(0, _NoTorchvision())
    load_package("timm", args.timm / "timm")
    dit_models = load_module("dit_models", args.dit / "models.py")
    sys.meta_path.pop(0)  # the stand-ins served timm only
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    load_package("guided_diffusion", args.guided_diffusion / "guided_diffusion")
    unet = importlib.import_module("guided_diffusion.unet")
    load_package("dnnlib", args.edm / "dnnlib")
    load_package("torch_utils", args.edm / "torch_utils")
    load_package("training", args.edm / "training")
    networks = importlib.import_module("training.networks")

    def save_edm(sd, kind):
        if kind == "ddpmpp":
            save_file(sd, str(OUT / "edm_ddpmpp.safetensors"))
        else:
            torch.save(sd, OUT / "edm_ncsnpp.pt")

    refs = {
        "dit": make_dit(torch, dit_models),
        "adm_imagenet": make_adm(torch, unet, "imagenet"),
        "adm_cifar": make_adm(torch, unet, "cifar"),
        "edm_ddpmpp": make_edm(torch, networks, "ddpmpp", save_edm),
        "edm_ncsnpp": make_edm(torch, networks, "ncsnpp", save_edm),
        "diffusers_dit": make_diffusers_dit(torch),
        "diffusers_vae": make_diffusers_vae(torch),
    }
    arrays = {f"{name}/{k}": np.asarray(v) for name, r in refs.items() for k, v in r.items()}
    np.savez_compressed(OUT / "reference_outputs.npz", **arrays)
    meta = dict(commits=COMMITS, torch=torch.__version__)
    (OUT / "README.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
