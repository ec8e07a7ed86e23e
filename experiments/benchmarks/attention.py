"""Attention throughput and memory: diffjax's Pallas flash attention against cuDNN, XLA and the
Pallas attention kernels bundled with JAX.

    python experiments/benchmarks/attention.py                  # full sweep, local accelerator
    python experiments/benchmarks/attention.py --tiny           # CPU smoke run, interpret mode
    python experiments/benchmarks/attention.py --gpu-blocks 128,64,64,64,8,3 --gpu-blocks ...

FLOPs (FlashAttention-2 convention, the same for every implementation; non-causal):
    forward = 4 * batch * heads * seq_q * seq_k * head_dim,
    backward = 2.5 * forward, so forward+backward = 3.5 * forward.
Memory is XLA's compiled memory analysis of the jitted forward+backward step: `temp` is what XLA
allocates beyond inputs and outputs (quadratic in seq for XLA attention, linear for flash kernels).

Prints a table and writes JSON (device, versions, date, settings, rows) to experiments/results/.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.io import atomic_write_text
from diffjax.kernels import (
    GpuBlockSizes,
    TpuBlockSizes,
    pallas_flash_attention,
    reference_attention,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
DEFAULT_SEQS = (256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_IMPLEMENTATIONS = {
    "gpu": ("diffjax_pallas_gpu", "cudnn", "xla", "jax_pallas_triton", "jax_pallas_mosaic_gpu"),
    "tpu": ("diffjax_pallas_tpu", "xla", "jax_pallas_tpu_flash", "jax_pallas_tpu_splash"),
    "cpu": ("diffjax_pallas_gpu", "diffjax_pallas_tpu", "xla", "jax_pallas_triton", "jax_pallas_tpu_flash"),
}


class Unavailable(Exception):
    """This implementation cannot run on this platform or with these settings."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """fn(q, k, v) -> out, all in `layout` ("bshd" or "bhsd"); traced and run inside context()."""

    layout: str
    fn: Callable
    context: Callable = contextlib.nullcontext


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int
    seq: int
    heads: int
    head_dim: int
    dtype: str

    def forward_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim


# --------------------------------------------------------------------------------------------------
# implementations: build(problem, interpret) -> Candidate, or raise Unavailable


def _diffjax(implementation, blocks=None):
    def build(problem, interpret):
        if implementation == "pallas_gpu" and not (interpret or _platform() == "gpu"):
            raise Unavailable("pallas_gpu needs a GPU or --interpret")
        if implementation == "pallas_tpu" and not (interpret or _platform() == "tpu"):
            raise Unavailable("pallas_tpu needs a TPU or --interpret")
        fn = lambda q, k, v: pallas_flash_attention(
            q, k, v, implementation=implementation, interpret=interpret, block_sizes=blocks
        )
        return Candidate("bshd", fn)

    return build


def _jax_nn(implementation):
    def build(problem, interpret):
        if implementation == "cudnn" and _platform() != "gpu":
            raise Unavailable("cuDNN needs an NVIDIA GPU")
        return Candidate("bshd", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation))

    return build


def _jax_pallas_triton(problem, interpret):
    if not (interpret or _platform() == "gpu"):
        raise Unavailable("needs a GPU or --interpret")
    from jax.experimental.pallas.ops.gpu import attention

    scale = problem.head_dim**-0.5
    blocks = attention.BlockSizes(
        block_q=min(128, problem.seq),
        block_k=min(128, problem.seq),
        block_q_dkv=min(32, problem.seq),
        block_kv_dkv=min(32, problem.seq),
        block_q_dq=min(32, problem.seq),
        block_kv_dq=min(32, problem.seq),
    )
    return Candidate(
        "bshd", lambda q, k, v: attention.mha(q, k, v, None, sm_scale=scale, block_sizes=blocks, interpret=interpret)
    )


def _jax_pallas_mosaic_gpu(problem, interpret):
    if _platform() != "gpu" or "H100" not in _device_kind() and "H200" not in _device_kind():
        raise Unavailable("Mosaic GPU attention needs a Hopper GPU")
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(
        block_q=128,
        block_kv=128,
        max_concurrent_steps=2,
        block_q_dkv=64,
        block_kv_dkv=64,
        block_q_dq=64,
        block_kv_dq=64,
    )
    return Candidate("bshd", lambda q, k, v: attention_mgpu.attention(q, k, v, config))


def _jax_pallas_tpu_flash(problem, interpret):
    if not (interpret or _platform() == "tpu"):
        raise Unavailable("needs a TPU or --interpret")
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention

    scale = problem.head_dim**-0.5
    fn = lambda q, k, v: flash_attention.flash_attention(q, k, v, sm_scale=scale)
    # Its forward and backward kernels are traced at different times: interpret the whole step.
    context = pltpu.force_tpu_interpret_mode if interpret else contextlib.nullcontext
    return Candidate("bhsd", fn, context)


def _jax_pallas_tpu_splash(problem, interpret):
    if _platform() != "tpu":
        raise Unavailable("needs a TPU")
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.FullMask((problem.seq, problem.seq))] * problem.heads)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    scale = problem.head_dim**-0.5  # splash does not scale: fold it into q
    return Candidate("bhsd", jax.vmap(lambda q, k, v: kernel(q * scale, k, v)))


BUILDERS = {
    "diffjax_pallas_gpu": _diffjax("pallas_gpu"),
    "diffjax_pallas_tpu": _diffjax("pallas_tpu"),
    "xla": _jax_nn("xla"),
    "cudnn": _jax_nn("cudnn"),
    "jax_pallas_triton": _jax_pallas_triton,
    "jax_pallas_mosaic_gpu": _jax_pallas_mosaic_gpu,
    "jax_pallas_tpu_flash": _jax_pallas_tpu_flash,
    "jax_pallas_tpu_splash": _jax_pallas_tpu_splash,
}


def _platform() -> str:
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def _device_kind() -> str:
    return jax.devices()[0].device_kind


# --------------------------------------------------------------------------------------------------
# measuring


FLOPS_CONVENTION = "forward 4*B*H*S*S*D (non-causal); backward 2.5x forward; forward+backward 3.5x forward"
FWD_BWD_FLOPS_FACTOR = 3.5  # backward = 2.5 x forward (FlashAttention-2's count), forward+backward = 3.5 x


def make_inputs(problem: Problem, layout: str = "bshd", seed: int = 0):
    """q, k, v, d_out drawn in (batch, seq, heads, head_dim), then laid out as `layout`: every
    implementation sees the same values."""
    shape = (problem.batch, problem.seq, problem.heads, problem.head_dim)
    keys = jax.random.split(jax.random.key(seed), 4)
    arrays = [jax.random.normal(key, shape, jnp.dtype(problem.dtype)) for key in keys]
    return [from_bshd(x, layout) for x in arrays]


def forward_and_backward(fn):
    """(q, k, v, d_out) -> (dq, dk, dv): one training step's attention work."""

    def step(q, k, v, d_out):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(d_out)

    return step


def time_compiled(fn, args, warmup: int, iters: int):
    """(median seconds per call of jit(fn)(*args), XLA's memory analysis, the last output)."""
    compiled = jax.jit(fn).lower(*args).compile()
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), _memory(compiled), out


def _memory(compiled):
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return {}
    if analysis is None:
        return {}
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }


def to_bshd(x, layout):
    return x if layout == "bshd" else jnp.transpose(x, (0, 2, 1, 3))


def from_bshd(x, layout):
    return x if layout == "bshd" else jnp.transpose(x, (0, 2, 1, 3))


@functools.partial(jax.jit, static_argnames="chunk")
def _chunked_reference(q, k, v, d_out, chunk):
    b, s, h, d = q.shape
    split = lambda x: x.astype(jnp.float32).reshape(b, s // chunk, chunk, h, d).swapaxes(0, 1)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)

    def body(carry, xs):
        q_i, d_out_i = xs
        out_i, vjp = jax.vjp(lambda q_, k_, v_: reference_attention(q_, k_, v_), q_i, k32, v32)
        dq_i, dk_i, dv_i = vjp(d_out_i)
        return (carry[0] + dk_i, carry[1] + dv_i), (out_i, dq_i)

    (dk, dv), (out, dq) = jax.lax.scan(body, (jnp.zeros_like(k32), jnp.zeros_like(v32)), (split(q), split(d_out)))
    join = lambda x: x.swapaxes(0, 1).reshape(b, s, h, d)
    return join(out), (join(dq), dk, dv)


def reference_values(q, k, v, d_out, chunk: int = 1024):
    """float32 reference output and (dq, dk, dv) of (batch, seq, heads, head_dim) inputs, computed over
    chunks of `chunk` queries (memory batch * heads * chunk * seq, not seq^2), at HIGHEST precision."""
    seq = q.shape[1]
    chunk = chunk if seq % chunk == 0 else seq
    with jax.default_matmul_precision("highest"):
        return _chunked_reference(q, k, v, d_out, min(chunk, seq))


def relative_errors(out, grads, layout, reference) -> dict:
    """||x - ref|| / ||ref|| of the output and of each gradient against `reference_values`."""
    ref_out, ref_grads = reference
    err = lambda a, b: float(jnp.linalg.norm(to_bshd(a, layout).astype(jnp.float32) - b) / jnp.linalg.norm(b))
    errors = {"out": err(out, ref_out)}
    if grads is not None:
        errors.update({f"d{n}": err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    return errors


def measure(name, build, problem, *, interpret=False, warmup=3, iters=20, reference=None, verbose=False):
    """One row: forward and forward+backward time, TFLOP/s and memory of implementation `name` on
    `problem`; with `reference` (`reference_values` of `make_inputs(problem)`), the relative errors."""
    row = {"implementation": name, **dataclasses.asdict(problem)}
    try:
        candidate = build(problem, interpret)
        fn = candidate.fn
        q, k, v, d_out = make_inputs(problem, candidate.layout)
        with candidate.context():
            fwd_s, fwd_mem, out = time_compiled(fn, (q, k, v), warmup, iters)
            bwd_s, bwd_mem, grads = time_compiled(forward_and_backward(fn), (q, k, v, d_out), warmup, iters)
        if reference is not None:
            row["relative_error"] = relative_errors(out, grads, candidate.layout, reference)
        flops = problem.forward_flops()
        row.update(
            forward_ms=fwd_s * 1e3,
            forward_tflops=flops / fwd_s / 1e12,
            fwd_bwd_ms=bwd_s * 1e3,
            fwd_bwd_tflops=FWD_BWD_FLOPS_FACTOR * flops / bwd_s / 1e12,
            forward_memory=fwd_mem,
            fwd_bwd_memory=bwd_mem,
        )
    except Unavailable as e:
        row["skipped"] = str(e)
    except Exception as e:  # noqa: BLE001 -- record the failure, keep benchmarking the others
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if verbose:
            traceback.print_exc()
    return row


# --------------------------------------------------------------------------------------------------
# reporting


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": _platform(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def format_table(rows) -> str:
    header = (
        f"{'implementation':<26}{'d':>5}{'seq':>7}{'batch':>6}{'heads':>6}"
        f"{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}{'f+b TF/s':>10}{'temp MiB':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        prefix = f"{r['implementation']:<26}{r['head_dim']:>5}{r['seq']:>7}{r['batch']:>6}{r['heads']:>6}"
        if "forward_ms" not in r:
            lines.append(prefix + "  " + (r.get("skipped") or r.get("error", ""))[:70])
            continue
        temp = r["fwd_bwd_memory"].get("temp_bytes")
        temp = f"{temp / 2**20:10.1f}" if temp is not None else f"{'-':>10}"
        lines.append(
            prefix + f"{r['forward_ms']:10.3f}{r['forward_tflops']:10.2f}"
            f"{r['fwd_bwd_ms']:10.3f}{r['fwd_bwd_tflops']:10.2f}" + temp
        )
    return "\n".join(lines)


def ratios_to(rows, baseline: str) -> list[dict]:
    """diffjax throughput / baseline throughput, per (head_dim, seq), forward and forward+backward."""
    by_key = {(r["implementation"], r["head_dim"], r["seq"]): r for r in rows if "forward_ms" in r}
    out = []
    for (name, d, seq), r in by_key.items():
        base = by_key.get((baseline, d, seq))
        if name.startswith("diffjax") and base is not None:
            out.append(
                {
                    "implementation": name,
                    "baseline": baseline,
                    "head_dim": d,
                    "seq": seq,
                    "forward": r["forward_tflops"] / base["forward_tflops"],
                    "fwd_bwd": r["fwd_bwd_tflops"] / base["fwd_bwd_tflops"],
                }
            )
    return out


def write_json(payload, path):
    """Atomic write: a crash never leaves a half-written results file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1, default=float))


def default_output_path(env) -> str:
    kind = "".join(c if c.isalnum() else "_" for c in env["device_kind"]).strip("_").lower()
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return os.path.join(RESULTS_DIR, f"attention_{env['platform']}_{kind}_{stamp}.json")


# --------------------------------------------------------------------------------------------------
# command line


def parse_blocks(text: str, cls):
    values = [int(x) for x in text.split(",")]
    return cls(*values)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=DEFAULT_SEQS)
    p.add_argument("--head-dims", type=int, nargs="+", default=(64, 128))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument(
        "--tokens",
        type=int,
        default=16384,
        help="batch * seq, held fixed across seq (FlashAttention-2 benchmark setting)",
    )
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    p.add_argument(
        "--implementations", nargs="+", default=None, help=f"any of {sorted(BUILDERS)}; default: the platform's set"
    )
    p.add_argument(
        "--gpu-blocks",
        action="append",
        default=[],
        help="extra diffjax_pallas_gpu row with GpuBlockSizes: "
        "block_q,block_k,block_q_bwd,block_k_bwd[,num_warps,num_stages]",
    )
    p.add_argument(
        "--tpu-blocks",
        action="append",
        default=[],
        help="extra diffjax_pallas_tpu row: block_q,block_k,block_q_bwd,block_k_bwd",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode")
    p.add_argument("--check", action="store_true", help="also measure error against the reference")
    p.add_argument("--check-max-seq", type=int, default=16384)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke run: seq 128, d 64, 2 heads, interpret mode, 1 iteration, --check",
    )
    p.add_argument("--out", default=None, help="JSON path (default: experiments/results/...)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.seqs, args.head_dims, args.tokens, args.hidden = (128,), (64,), 256, 128
        args.warmup, args.iters, args.interpret, args.check = 0, 1, True, True
    return args


def main(argv=None):
    args = parse_args(argv)
    env = environment()
    names = args.implementations or DEFAULT_IMPLEMENTATIONS.get(env["platform"], ("xla",))
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise SystemExit(f"unknown implementations {unknown}; choose from {sorted(BUILDERS)}")
    builders = {name: BUILDERS[name] for name in names}
    for text in args.gpu_blocks:
        builders[f"diffjax_pallas_gpu[{text}]"] = _diffjax("pallas_gpu", parse_blocks(text, GpuBlockSizes))
    for text in args.tpu_blocks:
        builders[f"diffjax_pallas_tpu[{text}]"] = _diffjax("pallas_tpu", parse_blocks(text, TpuBlockSizes))

    rows = []
    for head_dim in args.head_dims:
        for seq in args.seqs:
            problem = Problem(
                batch=max(1, args.tokens // seq),
                seq=seq,
                heads=max(1, args.hidden // head_dim),
                head_dim=head_dim,
                dtype=args.dtype,
            )
            reference = None
            if args.check and seq <= args.check_max_seq:
                reference = reference_values(*make_inputs(problem))
            for name, build in builders.items():
                row = measure(
                    name,
                    build,
                    problem,
                    interpret=args.interpret,
                    warmup=args.warmup,
                    iters=args.iters,
                    reference=reference,
                    verbose=args.verbose,
                )
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)

    baseline = "cudnn" if env["platform"] == "gpu" else "xla"
    payload = {
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "flops_convention": FLOPS_CONVENTION,
        "rows": rows,
        "ratios": ratios_to(rows, baseline),
    }
    path = args.out or default_output_path(env)
    write_json(payload, path)
    print()
    print(f"{env['device_kind']} ({env['platform']}), jax {env['jax']}, {env['date']}")
    print(format_table(rows))
    for r in payload["ratios"]:
        print(
            f"{r['implementation']} / {r['baseline']}  d={r['head_dim']} seq={r['seq']}: "
            f"forward {r['forward']:.2f}x, forward+backward {r['fwd_bwd']:.2f}x"
        )
    for r in rows:
        if "relative_error" in r:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in r["relative_error"].items())
            print(f"error vs reference  {r['implementation']} d={r['head_dim']} seq={r['seq']}: {errs}")
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
