"""Forward mode through attention: `jax.jvp` of diffjax's flash attention (Pallas forward + tangent
kernels) against `jax.jvp` of XLA attention, over sequence lengths: time (and its ratio to the
same implementation's plain forward), compiled memory, and (with --check) the error of the output
and its tangent against a float32 reference.

    python -m experiments.benchmarks.attention_jvp                  # full sweep, local accelerator
    python -m experiments.benchmarks.attention_jvp --tiny           # CPU smoke run, interpret mode

Also times `jax.grad` of a function of the JVP (what sCM / MeanFlow training differentiates when
the tangent is not behind a stop-gradient; its second derivative in (q, k, v) is plain JAX and
stores seq x seq arrays, see diffjax/kernels/attention.py), unless --no-grad.

FLOPs convention (non-causal, the same for every implementation): forward = 4 B H S^2 D (two
matmuls); the JVP adds five matmuls (Q K^T recomputed, dQ K^T, Q dK^T, (P dS) V, P dV), so
jvp = 3.5 x forward. Memory is XLA's compiled memory analysis of the jitted program: `temp` is
what XLA allocates beyond inputs and outputs (quadratic in S for XLA, linear for the kernels).

Prints a table and writes JSON and markdown (device, versions, date, settings, rows) through
experiments/benchmarks/common.py to experiments/results/attention_jvp_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
from tqdm import tqdm

from diffjax.kernels import flash_attention, reference_attention
from experiments.benchmarks import attention as attention_bench
from experiments.benchmarks.common import RESULTS_DIR, environment, markdown_table, slug, write_results

JVP_FLOPS_FACTOR = 3.5  # jvp = forward (2 matmuls) + tangent (5 matmuls), in units of the forward's 2
FLOPS_CONVENTION = "forward 4*B*H*S*S*D (non-causal); jvp 3.5x forward (7 matmuls of 2*B*H*S*S*D)"
DEFAULT_SEQS = (256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_IMPLEMENTATIONS = {"gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("pallas_gpu", "xla")}
IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Settings:
    seqs: tuple = DEFAULT_SEQS
    head_dim: int = 128
    dtype: str = "bfloat16"
    tokens: int = 16384  # batch * seq, held fixed across seq
    hidden: int = 2048  # heads * head_dim
    implementations: tuple | None = None  # None: the platform's default set
    warmup: int = 3
    iters: int = 20
    interpret: bool = False
    check: bool = False
    check_max_seq: int = 4096
    grad: bool = True


def attention(implementation: str, interpret: bool):
    return functools.partial(flash_attention, implementation=implementation, interpret=interpret)


def jvp_program(fn):
    """(q, k, v, tq, tk, tv) -> (out, d out)."""
    return lambda q, k, v, tq, tk, tv: jax.jvp(fn, (q, k, v), (tq, tk, tv))


def grad_of_jvp_program(fn):
    """(q, k, v, tq, tk, tv) -> gradients of sum(out^2) + sum(d out^2) in all six."""

    def loss(q, k, v, tq, tk, tv):
        out, t_out = jax.jvp(fn, (q, k, v), (tq, tk, tv))
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(t_out.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=range(6))


def make_inputs(problem: attention_bench.Problem, seed: int = 0):
    """q, k, v and tangents tq, tk, tv, (batch, seq, heads, head_dim), N(0, 1) in problem.dtype."""
    shape = (problem.batch, problem.seq, problem.heads, problem.head_dim)
    keys = jax.random.split(jax.random.key(seed), 6)
    return [jax.random.normal(key, shape, jnp.dtype(problem.dtype)) for key in keys]


@functools.partial(jax.jit, static_argnames="chunk")
def _chunked_reference_jvp(q, k, v, tq, tk, tv, chunk):
    """f32 jvp of the reference over chunks of `chunk` queries (memory B H chunk S, not S^2)."""
    b, s, h, d = q.shape
    split = lambda x: x.astype(jnp.float32).reshape(b, s // chunk, chunk, h, d).swapaxes(0, 1)
    f32 = lambda x: x.astype(jnp.float32)

    def one_chunk(xs):
        q_i, tq_i = xs
        return jax.jvp(reference_attention, (q_i, f32(k), f32(v)), (tq_i, f32(tk), f32(tv)))

    out, t_out = jax.lax.map(one_chunk, (split(q), split(tq)))
    join = lambda x: x.swapaxes(0, 1).reshape(b, s, h, d)
    return join(out), join(t_out)


def reference_jvp(q, k, v, tq, tk, tv, chunk: int = 1024):
    seq = q.shape[1]
    chunk = chunk if seq % chunk == 0 else seq
    with jax.default_matmul_precision("highest"):
        return _chunked_reference_jvp(q, k, v, tq, tk, tv, min(chunk, seq))


def relative_error(x, ref) -> float:
    x = x.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def unavailable_reason(implementation: str, interpret: bool) -> str | None:
    platform = attention_bench._platform()
    if implementation == "pallas_gpu" and not (interpret or platform == "gpu"):
        return "pallas_gpu needs a GPU or --interpret"
    if implementation == "pallas_tpu" and not (interpret or platform == "tpu"):
        return "pallas_tpu needs a TPU or --interpret"
    if implementation == "cudnn" and platform != "gpu":
        return "cuDNN needs an NVIDIA GPU"
    return None


def measure(implementation: str, problem, settings: Settings, reference=None) -> dict:
    """One row: jvp (and grad-of-jvp) time, TFLOP/s, compiled memory; errors against `reference`."""
    row = {"implementation": implementation, **dataclasses.asdict(problem)}
    reason = unavailable_reason(implementation, settings.interpret)
    if reason:
        return {**row, "skipped": reason}
    interpret = settings.interpret and implementation in ("pallas_gpu", "pallas_tpu")
    fn = attention(implementation, interpret)
    args = make_inputs(problem)
    try:
        forward_s, _, _ = attention_bench.time_compiled(fn, args[:3], settings.warmup, settings.iters)
        seconds, memory, (out, t_out) = attention_bench.time_compiled(
            jvp_program(fn), args, settings.warmup, settings.iters
        )
        row.update(
            forward_ms=forward_s * 1e3,
            jvp_ms=seconds * 1e3,
            jvp_over_forward=seconds / forward_s,
            jvp_tflops=JVP_FLOPS_FACTOR * problem.forward_flops() / seconds / 1e12,
            jvp_memory=memory,
        )
        if reference is not None:
            row["relative_error"] = {
                "out": relative_error(out, reference[0]),
                "tangent": relative_error(t_out, reference[1]),
            }
        if settings.grad:
            seconds, memory, _ = attention_bench.time_compiled(
                grad_of_jvp_program(fn), args, settings.warmup, settings.iters
            )
            row.update(grad_of_jvp_ms=seconds * 1e3, grad_of_jvp_memory=memory)
    except Exception as err:  # noqa: BLE001 -- record the failure (e.g. out of memory), go on
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def run(settings: Settings) -> list[dict]:
    """Every (seq, implementation) row of the sweep."""
    platform = attention_bench._platform()
    names = settings.implementations or DEFAULT_IMPLEMENTATIONS.get(platform, ("xla",))
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; allowed: {list(IMPLEMENTATIONS)}")
    rows = []
    for seq in tqdm(settings.seqs, desc="attention jvp", unit="seq"):
        problem = attention_bench.Problem(
            batch=max(1, settings.tokens // seq),
            seq=seq,
            heads=max(1, settings.hidden // settings.head_dim),
            head_dim=settings.head_dim,
            dtype=settings.dtype,
        )
        reference = None
        if settings.check and seq <= settings.check_max_seq:
            reference = reference_jvp(*make_inputs(problem))
        for name in names:
            rows.append(measure(name, problem, settings, reference))
            tqdm.write(format_rows(rows[-1:]).splitlines()[-1])
    return rows


HEADERS = ["implementation", "seq", "batch", "heads", "d", "fwd ms", "jvp ms", "jvp/fwd", "jvp TF/s", "jvp temp MiB"]
HEADERS += ["grad(jvp) ms", "grad(jvp) temp MiB", "rel err out", "rel err tangent", "note"]


def _mib(memory: dict | None):
    if not memory or "temp_bytes" not in memory:
        return "-"
    return f"{memory['temp_bytes'] / 2**20:.1f}"


def table_rows(rows) -> list[list]:
    out = []
    for r in rows:
        errors = r.get("relative_error", {})
        out.append(
            [
                r["implementation"],
                r["seq"],
                r["batch"],
                r["heads"],
                r["head_dim"],
                f"{r['forward_ms']:.3f}" if "forward_ms" in r else "-",
                f"{r['jvp_ms']:.3f}" if "jvp_ms" in r else "-",
                f"{r['jvp_over_forward']:.2f}" if "jvp_over_forward" in r else "-",
                f"{r['jvp_tflops']:.2f}" if "jvp_tflops" in r else "-",
                _mib(r.get("jvp_memory")),
                f"{r['grad_of_jvp_ms']:.3f}" if "grad_of_jvp_ms" in r else "-",
                _mib(r.get("grad_of_jvp_memory")),
                f"{errors['out']:.1e}" if "out" in errors else "-",
                f"{errors['tangent']:.1e}" if "tangent" in errors else "-",
                (r.get("skipped") or r.get("error") or "")[:80],
            ]
        )
    return out


def format_rows(rows) -> str:
    return markdown_table(HEADERS, table_rows(rows))


def ratios(rows, baseline: str = "xla") -> list[dict]:
    """kernel jvp time / baseline jvp time and temp-memory ratio, per seq."""
    by_key = {(r["implementation"], r["seq"]): r for r in rows if "jvp_ms" in r}
    out = []
    for (name, seq), r in by_key.items():
        base = by_key.get((baseline, seq))
        if name != baseline and base is not None:
            temp, base_temp = r["jvp_memory"].get("temp_bytes"), base["jvp_memory"].get("temp_bytes")
            out.append(
                {
                    "implementation": name,
                    "baseline": baseline,
                    "seq": seq,
                    "speedup": base["jvp_ms"] / r["jvp_ms"],
                    "temp_memory_ratio": temp / base_temp if temp is not None and base_temp else None,
                }
            )
    return out


def parse_args(argv=None) -> tuple[Settings, str, str | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=DEFAULT_SEQS)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq, held fixed across seq")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--implementations", nargs="+", default=None, help=f"any of {list(IMPLEMENTATIONS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode")
    p.add_argument("--check", action="store_true", help="errors against the f32 reference (seq <= --check-max-seq)")
    p.add_argument("--check-max-seq", type=int, default=4096)
    p.add_argument("--no-grad", action="store_true", help="skip grad of a function of the jvp")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: seq 64 and 128, d 32, interpret, --check")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--name", default=None, help="results file name (default attention_jvp_<device>)")
    args = p.parse_args(argv)
    settings = Settings(
        seqs=tuple(args.seqs),
        head_dim=args.head_dim,
        dtype=args.dtype,
        tokens=args.tokens,
        hidden=args.hidden,
        implementations=tuple(args.implementations) if args.implementations else None,
        warmup=args.warmup,
        iters=args.iters,
        interpret=args.interpret,
        check=args.check,
        check_max_seq=args.check_max_seq,
        grad=not args.no_grad,
    )
    if args.tiny:
        settings = dataclasses.replace(
            settings,
            seqs=(64, 128),
            head_dim=32,
            dtype="float32",
            tokens=128,
            hidden=64,
            warmup=0,
            iters=1,
            interpret=True,
            check=True,
        )
    return settings, args.out_dir, args.name


def main(argv=None):
    settings, out_dir, name = parse_args(argv)
    rows = run(settings)
    env = environment()
    name = name or f"attention_jvp_{slug(env['device'])}" + ("_interpret" if settings.interpret else "")
    payload = {
        "settings": dataclasses.asdict(settings),
        "flops_convention": FLOPS_CONVENTION,
        "rows": rows,
        "ratios": ratios(rows),
    }
    lines = [
        f"# jax.jvp through attention ({env['device']}, jax {env['versions']['jax']}, {env['date']})",
        "",
        f"Settings: {dataclasses.asdict(settings)}. FLOPs: {FLOPS_CONVENTION}.",
        "",
        format_rows(rows),
        "",
    ]
    lines += [
        f"- {r['implementation']} vs {r['baseline']} seq={r['seq']}: jvp speed-up {r['speedup']:.2f}x"
        + (f", temp memory {r['temp_memory_ratio']:.3f}x" if r["temp_memory_ratio"] is not None else "")
        for r in payload["ratios"]
    ]
    markdown = "\n".join(lines)
    path = write_results(name, payload, markdown, directory=out_dir)
    print(markdown)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
