"""Writes tests/fixtures/pretrained/diffusers_ddpm/: a tiny random-weight diffusers `DDPMPipeline`
folder (model_index.json, unet/ with config.json + diffusion_pytorch_model.safetensors, scheduler/)
in google/ddpm-cifar10-32's architecture (DDPM U-Net: DownBlock2D / AttnDownBlock2D, one attention
head, GroupNorm eps 1e-6, downsample_padding 0, freq_shift 1, sin before cos), plus the reference
outputs on fixed inputs in reference_diffusers_ddpm.npz (float32, CPU). The scheduler is the cosine
schedule with v-prediction so that the loader's mapping of both is checked (the published model uses
"linear" and "epsilon").

    python -m experiments.pretrained.make_diffusers_unet      (needs the peers extra: torch, diffusers)
"""

from __future__ import annotations

import shutil

import numpy as np

from experiments.pretrained.make_fixtures import OUT, inputs, nhwc, perturb


def main():
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.set_grad_enabled(False)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=2,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,
    ).eval()
    perturb(torch, unet, 6)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    x, t = inputs(torch, 3, 8, 17), torch.tensor([3, 900])
    out = unet(x, timestep=t).sample
    folder = OUT / "diffusers_ddpm"
    shutil.rmtree(folder, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    np.savez_compressed(
        OUT / "reference_diffusers_ddpm.npz",
        x=nhwc(x),
        t=t.numpy(),
        out=nhwc(out),
        alphas_cumprod=scheduler.alphas_cumprod.numpy(),
    )
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"wrote {folder} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
