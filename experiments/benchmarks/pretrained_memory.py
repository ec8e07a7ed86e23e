"""Host memory of `load_pretrained` on a DiT checkpoint in the original format (a torch.save'd state
dict of random weights, written here with torch): peak RSS of a fresh process that only loads it,
divided by the checkpoint's size. Prints a table and writes experiments/results/pretrained_memory_<model>.*.

    python experiments/benchmarks/pretrained_memory.py --model DiT-B/2 [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.benchmarks.common import markdown_table, write_results

SIZES = {"DiT-S/2": (12, 384, 6), "DiT-B/2": (12, 768, 12), "DiT-L/2": (24, 1024, 16), "DiT-XL/2": (28, 1152, 16)}


def write_checkpoint(model: str, path: Path) -> None:
    import torch

    depth, d, _ = SIZES[model]
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    sd = {"x_embedder.proj.weight": r(d, 4, 2, 2), "x_embedder.proj.bias": r(d), "pos_embed": torch.zeros(1, 256, d)}
    sd.update({"t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d)})
    sd.update({"t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d)})
    sd["y_embedder.embedding_table.weight"] = r(1001, d)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d)})
        sd.update({b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d)})
        sd.update({b + "mlp.fc1.weight": r(4 * d, d), b + "mlp.fc1.bias": r(4 * d)})
        sd.update({b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
        sd.update({b + "adaLN_modulation.1.weight": r(6 * d, d), b + "adaLN_modulation.1.bias": r(6 * d)})
    sd.update({"final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d)})
    sd.update({"final_layer.linear.weight": r(32, d), "final_layer.linear.bias": r(32)})
    torch.save(sd, path)


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: peak resident of this process
    image; unlike getrusage's ru_maxrss, which Linux carries over from the parent across fork/exec,
    so the parent's torch-written checkpoint would count as the child's baseline)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def load_only(path: str) -> None:
    """Child process: import, measure the baseline RSS, load, measure the peak."""
    import jax

    from diffjax.models import load_pretrained

    jax.numpy.zeros(1).block_until_ready()
    base = _status_kb("VmRSS")
    pt = load_pretrained(path)
    jax.block_until_ready(pt.params)
    peak = _status_kb("VmHWM")
    print(f"{base} {peak}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="DiT-B/2", choices=sorted(SIZES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        load_only(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        write_checkpoint(args.model, path)
        row = measure(args.model, path)
    table = markdown_table(list(row), [list(row.values())])
    print(table)
    write_results(f"pretrained_memory_{args.model.replace('/', '-')}", {"rows": [row]}, table)


def measure(name: str, path: Path) -> dict:
    """Baseline and peak RSS of a fresh process that loads `path` with load_pretrained."""
    size = path.stat().st_size
    out = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.pretrained_memory", "--child", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    ).stdout.split()
    base_kb, peak_kb = int(out[-2]), int(out[-1])
    return {
        "model": name,
        "checkpoint_MB": round(size / 1e6, 1),
        "baseline_RSS_MB": round(base_kb / 1e3, 1),
        "peak_RSS_MB": round(peak_kb / 1e3, 1),
        "(peak - baseline) / size": round((peak_kb * 1e3 - base_kb * 1e3) / size, 2),
    }


if __name__ == "__main__":
    main()
