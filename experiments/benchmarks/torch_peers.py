"""The PyTorch side of the side-by-side benchmarks (cpu_vs_torch.py, device_check.py): diffusers
models of the same size as ours and a training step with the same loss, optimizer and EMA.

torch and diffusers come from the `peers` extra and are imported only when a function here is
called, so importing this module costs nothing and needs neither.

The step: x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps with t ~ U(0, 1), the network sees
(x_t, 1000 t, labels), loss = mean (prediction - eps)^2, AdamW (no weight decay), then an EMA of
the parameters (decay 0.999), as diffjax's train step does (its gradient clipping is switched off
on both sides). Images are NCHW on the torch side, NHWC on ours.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

from diffjax import models


def import_torch():
    """(torch, diffusers); ImportError with the reason when either is missing."""
    import diffusers
    import torch

    return torch, diffusers


def torch_versions() -> dict:
    """Versions of torch and diffusers, or the reason they cannot be imported."""
    try:
        torch, diffusers = import_torch()
    except ImportError as err:
        return {"torch": None, "reason": str(err)}
    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


def diffusers_dit(cfg: models.DiTConfig):
    """diffusers' DiTTransformer2DModel with the sizes of our `cfg` (eps only: out_channels = in_channels)."""
    _, diffusers = import_torch()
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_layers=cfg.depth,
        patch_size=cfg.patch_size,
        sample_size=cfg.hw[0],
        num_embeds_ada_norm=cfg.num_classes or 1000,
    )


def diffusers_unet(cfg: models.ADMUNetConfig):
    """diffusers' UNet2DModel shaped like our ADM U-Net `cfg`: the same levels, channels, residual
    blocks per level, attention resolutions, head width and GroupNorm groups (parameter counts
    differ slightly: report both)."""
    _, diffusers = import_torch()
    resolutions = [cfg.hw[0] // 2**i for i in range(len(cfg.channel_mult))]
    attention = [r in cfg.attn_resolutions for r in resolutions]
    return diffusers.UNet2DModel(
        sample_size=cfg.hw[0],
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=tuple(m * cfg.model_channels for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=cfg.num_head_channels if cfg.num_head_channels > 0 else None,
        norm_num_groups=cfg.norm_groups,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
    )


def forward_of(model, conditional: bool) -> Callable:
    """forward(x, t, y) -> prediction tensor of a diffusers model (labels only when `conditional`)."""
    if conditional:
        return lambda x, t, y: model(x, timestep=t, class_labels=y).sample
    return lambda x, t, y: model(x, timestep=t).sample


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass
class TorchStep:
    """step(x0, y) -> loss: one training step of `model`; `sync()` waits for the device."""

    step: Callable
    sync: Callable


def make_train_step(
    model,
    forward: Callable,
    *,
    device: str = "cpu",
    autocast_dtype=None,
    learning_rate: float = 1e-4,
    ema_decay: float = 0.999,
) -> TorchStep:
    """eps-MSE + AdamW + EMA, the step described in the module docstring. `forward` may be a
    torch.compile'd function of the same model."""
    torch, _ = import_torch()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, **fused)
    ema = [p.detach().clone() for p in params]

    def step(x0, y):
        t = torch.rand(x0.shape[0], device=x0.device)
        eps = torch.randn_like(x0)
        angle = (0.5 * math.pi * t).view(-1, 1, 1, 1)
        x_t = torch.cos(angle) * x0 + torch.sin(angle) * eps
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = forward(x_t, 1000.0 * t, y)
        loss = torch.mean((prediction.float() - eps) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
        return loss.detach()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return TorchStep(step, sync)


def time_steps(torch_step: TorchStep, x0, y, warmup: int, steps: int) -> dict:
    """first_step_s (the first call: eager warm-up or torch.compile), then the median of `steps`
    timed steps after `warmup` more."""
    start = time.perf_counter()
    loss = torch_step.step(x0, y)
    torch_step.sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        torch_step.step(x0, y)
    torch_step.sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = torch_step.step(x0, y)
        torch_step.sync()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "step_s": statistics.median(times), "step_times_s": times, "loss": float(loss)}
