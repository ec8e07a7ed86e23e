"""Train-step throughput: images/s, step time, model FLOPs and MFU of the full sharded train step.

The step is the one diffjax.training runs: `build_run` builds the run from a config (configs/
dit_latents.py for DiT presets, configs/cifar10_{edm,ncsnpp_ve,ddpmpp_vp}.py for the U-Nets) with
the model preset, batch size, compute dtype and remat swapped in, and `make_jitted_train_step`
jits loss + grad + clipping + Adam(W) + EMA under the mesh with the state's shardings. Batches are
synthetic (32x32x4 latents with 1000 classes for DiT, 32x32x3 images for the U-Nets), so no data
is read. After `--warmup` steps, `--steps` steps are timed one by one with block_until_ready; the
median gives the step time.

Model FLOPs per image = 3 x 2 x forward MACs (forward, plus a backward of twice the forward),
with the MACs counted from the architecture (`models.dit_forward_macs` / `models.forward_macs`);
recomputation under remat is not model FLOPs. They are cross-checked against XLA's
cost_analysis() of the compiled step (per device, times the devices): ratio = XLA / model. XLA
also counts the elementwise work (norms, activations, optimizer, EMA: ratio > 1) but skips
convolution taps on zero padding and the input gradient of the first layer (U-Nets: ratio < 1).
With scan_layers XLA counts a loop body once, so DiT runs unrolled unless --scan_layers.
MFU = achieved model FLOP/s / (devices x peak), the peak the dense bf16 one from PEAK_TFLOPS for
the device (or --peak_tflops); n/a on CPU.

    python -m experiments.benchmarks.train_step --presets DiT-S/2,DDPM++-cifar10 --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import jax
import numpy as np
from flax import nnx

from diffjax import data as data_lib
from diffjax import models
from diffjax.training import sharding as shard_lib
from diffjax.training.config import model_preset_overrides
from diffjax.training.from_config import mesh_from_config, model_config_from_config
from diffjax.training.run import Run, build_run, init_state, make_jitted_train_step
from experiments.benchmarks.common import environment, markdown_table, write_results

DEFAULT_PRESETS = (
    "DiT-S/2",
    "DiT-B/2",
    "DiT-L/2",
    "DiT-XL/2",
    "DDPM++-cifar10",
    "NCSN++-cifar10",
    "DDPM++-cifar10-edm",
)

# Dense bf16 peak TFLOP/s per device; the first substring found in the lower-cased device kind wins.
PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("gh200", 989.0),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_TFLOPS if name in kind), None)


def config_for(preset: str):
    """The experiment config a preset is benchmarked in (its training recipe: process, loss, optimizer)."""
    if preset.startswith("DiT-"):
        name = "dit_latents"
    elif preset.endswith("-edm"):
        name = "cifar10_edm"
    elif preset.startswith("NCSN++"):
        name = "cifar10_ncsnpp_ve"
    else:
        name = "cifar10_ddpmpp_vp"
    return importlib.import_module(f"configs.{name}").get_config()


def synthetic_data_info(preset: str) -> data_lib.DataInfo:
    """The data a preset's model expects: its image size and channels, its classes (10 if none)."""
    cfg = models.get_config(preset)
    shape = (*cfg.hw, cfg.in_channels)
    return data_lib.DataInfo(shape, shape, {"train": 1_000_000}, cfg.num_classes or 10)


def prepare_synthetic_run(config, workdir: str, data_info: data_lib.DataInfo) -> Run:
    """The run of `config` for data described by `data_info` (nothing is read; workdir is unused)."""
    del workdir
    return build_run(config, data_info, mesh_from_config(config))


def benchmark_config(
    preset: str, batch: int, dtype: str, remat: str, scan_layers: bool, model_changes: dict | None = None, config=None
):
    """`config` (default: the preset's, `config_for`) with the model preset, its dtype, remat (and
    scan_layers for DiT) and any other preset fields in `model_changes` (e.g. a tiny depth), and the
    batch size for training, sampling and evaluation."""
    config = config_for(preset) if config is None else config
    extra = {"scan_layers": scan_layers} if preset.startswith("DiT-") else {}
    config.model.name = preset
    config.model.overrides = model_preset_overrides(preset, dtype=dtype, remat=remat, **extra, **(model_changes or {}))
    config.train.batch_size = config.sample.num_samples = config.eval.batch_size = batch
    config.train.async_checkpointing = False
    return config


def forward_macs_per_image(config, run: Run) -> int:
    model_config = model_config_from_config(config, run.image_shape, run.spec.num_classes, run.process)
    if isinstance(model_config, models.DiTConfig):
        return models.dit_forward_macs(model_config)
    return models.forward_macs(nnx.eval_shape(lambda: models.build(model_config)))


def synthetic_batch(run: Run, batch: int, num_classes: int) -> dict:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *run.image_shape), dtype=np.float32)
    labels = rng.integers(0, num_classes, batch, dtype=np.int32)
    return {
        "image": jax.device_put(images, shard_lib.batch_sharding(run.mesh, 4)),
        "label": jax.device_put(labels, shard_lib.batch_sharding(run.mesh, 1)),
    }


def measure(
    preset: str,
    batch: int,
    dtype: str,
    remat: str,
    scan_layers: bool,
    warmup: int,
    steps: int,
    peak: float | None,
    model_changes: dict | None = None,
) -> dict:
    """One row: compile time, median step time, images/s, model and XLA FLOPs and MFU of the full
    train step of `preset` (with `model_changes` to its config) on synthetic data."""
    config = benchmark_config(preset, batch, dtype, remat, scan_layers, model_changes)
    data_info = synthetic_data_info(preset)  # the data set's description, given instead of read
    run = prepare_synthetic_run(config, "", data_info)
    step = make_jitted_train_step(run)
    state = init_state(run)
    data = synthetic_batch(run, batch, data_info.num_classes)
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost["flops"]) * run.mesh.devices.size  # cost_analysis is per device

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])

    step_s = statistics.median(times)
    model_flops = 6 * forward_macs_per_image(config, run)
    devices = run.mesh.devices.size
    achieved = model_flops * batch / step_s
    return {
        "preset": preset,
        "model_changes": dict(model_changes or {}),
        "batch": batch,
        "dtype": dtype,
        "remat": remat,
        "scan_layers": scan_layers if preset.startswith("DiT-") else None,
        "params_M": run.spec.num_params / 1e6,
        "devices": devices,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_times_s": times,
        "images_per_s": batch / step_s,
        "model_gflops_per_image": model_flops / 1e9,
        "xla_gflops_per_image": xla_flops / batch / 1e9,
        "xla_to_model_flops": xla_flops / batch / model_flops,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (devices * peak * 1e12) if peak else None,
        "loss": loss,
    }


def render_markdown(env: dict, args, platform: str, peak: float | None, rows: list[dict]) -> str:
    headers = [
        "model",
        "params (M)",
        "batch",
        "dtype",
        "remat",
        "step (ms)",
        "images/s",
        "model GFLOP/img",
        "XLA GFLOP/img",
        "XLA / model",
        "TFLOP/s",
        "MFU",
    ]
    table = [
        [
            r["preset"],
            f"{r['params_M']:.1f}",
            r["batch"],
            r["dtype"],
            r["remat"],
            f"{1e3 * r['step_s']:.0f}",
            f"{r['images_per_s']:.3g}",
            f"{r['model_gflops_per_image']:.2f}",
            f"{r['xla_gflops_per_image']:.2f}",
            f"{r['xla_to_model_flops']:.3f}",
            f"{r['achieved_tflops']:.3g}",
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
        ]
        for r in rows
    ]
    title = (
        f"# Train step ({env['device']} x {env['device_count']}, {env['date']}, jax "
        f"{env['versions']['jax']}; warm-up {args.warmup}, median of {args.steps} steps)"
    )
    if peak:
        peak_line = f"MFU against a dense bf16 peak of {peak:g} TFLOP/s per device."
    else:
        peak_line = "MFU: n/a " + ("on CPU." if platform == "cpu" else "(unknown device: pass --peak_tflops).")
    flops_line = (
        "Model FLOPs = 6 x forward MACs per image; XLA = cost_analysis() of the compiled step "
        "(elementwise work included, padded convolution taps excluded)."
    )
    return "\n\n".join(x for x in (title, args.note, peak_line, flops_line, markdown_table(headers, table)) if x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--dtype", default="bfloat16", choices=models.configs.DTYPES, help="compute dtype")
    parser.add_argument("--remat", default="none", choices=models.REMAT_CHOICES)
    parser.add_argument("--scan_layers", action="store_true", help="scan the DiT blocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak (default: PEAK_TFLOPS)")
    parser.add_argument("--name", default="train_step", help="results/<name>.{json,md}")
    parser.add_argument("--note", default="", help="a line above the table")
    args = parser.parse_args(argv)

    env = environment()
    device = jax.devices()[0]
    peak = args.peak_tflops or (None if device.platform == "cpu" else peak_tflops(device.device_kind))
    rows = []
    for preset in args.presets.split(","):
        row = measure(preset, args.batch, args.dtype, args.remat, args.scan_layers, args.warmup, args.steps, peak)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "step_times_s"}, flush=True)

    markdown = render_markdown(env, args, device.platform, peak, rows)
    print(markdown)
    payload = {"args": vars(args), "peak_tflops_per_device": peak, "results": rows}
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
