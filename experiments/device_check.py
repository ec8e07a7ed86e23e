"""One prepared accelerator check: everything we want to know about one GPU in at most 8 minutes.

    python -m experiments.device_check                       # one H100/H200, JAX with CUDA
    python -m experiments.device_check --dry-run --out-dir /tmp/dc   # CPU, tiny sizes, every code path
    experiments/device_check.sh                              # the same with a hard wall-clock stop

Sections, each with a share of the time (`--budget-s`, default 420 s: torch 80, attention 140,
train step 140, sampling 60; the rest of the 8 minutes is start-up and slack):

1. attention: flash attention forward and forward+backward, bf16, head dims 128 and 64, sequence
   1k-16k at 16k tokens (batch = 16384 / seq) and 2048 hidden (heads = 2048 / head_dim): our Pallas
   kernel vs cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) vs XLA vs JAX's Pallas
   ops (Triton, and Mosaic GPU on Hopper). FLOPs: forward 4 B H S^2 D (non-causal), backward 2.5x
   forward (FlashAttention-2's count), so forward+backward = 3.5x forward. Relative errors of the
   output and of dq, dk, dv against the float32 reference on the same inputs (computed over query
   chunks, so 16k fits).
2. train_step: the full diffjax train step (loss, grad, AdamW, EMA) of DiT-B/2 and DiT-XL/2 (bf16,
   remat choices) on 32x32x4 latents and of DDPM++ at CIFAR-10 size (32x32x3): images/s and MFU
   against 989 TFLOP/s (H100/H200 dense bf16). Model FLOPs are counted analytically: 6 x forward MACs
   per image (`models.dit_forward_macs`, `models.forward_macs`); XLA's cost analysis of the compiled
   step is reported beside them (the ratio column).
3. torch_train_step: the same DiT-B/2 step in PyTorch (diffusers' DiTTransformer2DModel, eps-MSE,
   AdamW, EMA, bf16 autocast), eager and torch.compile, if torch (with CUDA) and diffusers import;
   nothing is installed. It runs FIRST, in a child process, before JAX takes the GPU's memory, so
   the two frameworks' CUDA libraries and memory pools never meet; the ratio to our step is filled
   in at the end.
4. sampling: `sample()` images/s at 10 and 50 NFE (default solver, final denoising included) on
   DiT-B/2 latents (32x32x4), the whole loop one jitted program; the first call's time (compile) too.

Every item is guarded by time: an item whose estimated cost does not fit in what is left of its
section (and of the whole run) is skipped with the reason in the table, and the table (JSON and
markdown, device, versions, date) is rewritten after every item, so a run stopped from outside
still leaves everything measured so far. Results: experiments/results/device_check_<device>.{json,md}
(`--out-dir` elsewhere; `--dry-run` refuses experiments/results and defaults to a temporary folder).

`--dry-run` (CPU): the same code with tiny sizes (sequence 128 with the Pallas kernels in interpret
mode; a 1-block DiT and a 1-level U-Net; 1 warm-up and 1 timed step; 2 NFE). cuDNN and
Mosaic GPU cannot run on a CPU: their rows are skipped with that reason. torch.compile uses the
"eager" backend there (Dynamo without Inductor's C++ build).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import models
from diffjax import processes as P
from diffjax.denoisers import Denoiser
from diffjax.io import atomic_write_json
from diffjax.samplers import default_solver, sample
from experiments.benchmarks import attention as attention_bench
from experiments.benchmarks import torch_peers
from experiments.benchmarks import train_step as train_bench
from experiments.benchmarks.common import (
    RESULTS_DIR,
    environment,
    markdown_table,
    package_versions,
    slug,
    write_results,
)

SECTIONS = ("torch_train_step", "attention", "train_step", "sampling")
PEAK_TFLOPS_H100 = 989.0


@dataclasses.dataclass(frozen=True)
class TrainRow:
    preset: str
    batch: int
    remat: str
    scan_layers: bool = False
    estimate_s: float = 60.0  # compile + warm-up + steps, the time guard's guess before it has measured
    model_changes: tuple = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time shares; `full_plan()` for a GPU, `dry_plan()` for the CPU dry run."""

    budgets_s: dict  # section -> seconds
    head_dims: tuple
    seqs: tuple  # in order of priority: what the time guard reaches first
    tokens: int
    hidden: int
    attention_implementations: tuple
    interpret: bool
    attention_warmup: int
    attention_iters: int
    attention_estimate_s: float
    train_rows: tuple
    train_warmup: int
    train_steps: int
    torch_preset: str
    torch_batch: int
    torch_model_changes: tuple
    torch_compile_backend: str
    torch_estimate_s: float
    sample_preset: str
    sample_batch: int
    sample_nfes: tuple
    sample_model_changes: tuple
    sample_repeats: int
    sample_estimate_s: float


def full_plan() -> Plan:
    return Plan(
        budgets_s={"torch_train_step": 80.0, "attention": 140.0, "train_step": 140.0, "sampling": 60.0},
        head_dims=(128, 64),
        seqs=(1024, 4096, 16384, 2048, 8192),
        tokens=16384,
        hidden=2048,
        attention_implementations=(
            "diffjax_pallas_gpu",
            "cudnn",
            "xla",
            "jax_pallas_triton",
            "jax_pallas_mosaic_gpu",
        ),
        interpret=False,
        attention_warmup=2,
        attention_iters=10,
        attention_estimate_s=8.0,
        train_rows=(
            TrainRow("DiT-B/2", 256, "none", estimate_s=45.0),
            TrainRow("DiT-XL/2", 128, "full", scan_layers=True, estimate_s=60.0),
            TrainRow("DDPM++-cifar10", 128, "none", estimate_s=45.0),
            TrainRow("DiT-B/2", 256, "full", estimate_s=45.0),
            TrainRow("DiT-XL/2", 128, "dots_no_batch", scan_layers=True, estimate_s=60.0),
        ),
        train_warmup=2,
        train_steps=8,
        torch_preset="DiT-B/2",
        torch_batch=256,
        torch_model_changes=(),
        torch_compile_backend="inductor",
        torch_estimate_s=25.0,
        sample_preset="DiT-B/2",
        sample_batch=256,
        sample_nfes=(10, 50),
        sample_model_changes=(),
        sample_repeats=3,
        sample_estimate_s=25.0,
    )


TINY_DIT = (("hidden_size", 32), ("depth", 1), ("num_heads", 2))
TINY_UNET = (("nf", 16), ("ch_mult", (1,)), ("num_res_blocks", 1), ("attn_resolutions", (32,)), ("dropout", 0.0))


def dry_plan() -> Plan:
    return Plan(
        budgets_s={name: 600.0 for name in SECTIONS},  # never skip in a dry run: every path runs
        head_dims=(64,),
        seqs=(128,),
        tokens=128,
        hidden=128,
        attention_implementations=full_plan().attention_implementations,
        interpret=True,
        attention_warmup=0,
        attention_iters=1,
        attention_estimate_s=1.0,
        train_rows=(
            TrainRow("DiT-B/2", 2, "none", estimate_s=1.0, model_changes=TINY_DIT),
            TrainRow("DiT-XL/2", 2, "full", scan_layers=True, estimate_s=1.0, model_changes=TINY_DIT),
            TrainRow("DDPM++-cifar10", 2, "none", estimate_s=1.0, model_changes=TINY_UNET),
        ),
        train_warmup=1,
        train_steps=1,
        torch_preset="DiT-B/2",
        torch_batch=2,
        torch_model_changes=TINY_DIT,
        torch_compile_backend="eager",
        torch_estimate_s=1.0,
        sample_preset="DiT-B/2",
        sample_batch=2,
        sample_nfes=(2,),
        sample_model_changes=TINY_DIT,
        sample_repeats=1,
        sample_estimate_s=1.0,
    )


# --------------------------------------------------------------------------------------------------
# the time guard


class TimeGuard:
    """Section deadlines from one overall deadline: section i must end `sum(budgets of the later
    sections)` before the end, so time an early section leaves unused goes to the later ones and
    none can eat a later one's share."""

    def __init__(self, budgets_s: dict, sections: tuple, clock: Callable = time.perf_counter):
        self.clock = clock
        self.budgets_s = {name: budgets_s[name] for name in sections}
        self.end = clock() + sum(self.budgets_s.values())
        self.section = None

    def start(self, section: str) -> None:
        self.section = section

    def deadline(self) -> float:
        names = list(self.budgets_s)
        later = names[names.index(self.section) + 1 :]
        return self.end - sum(self.budgets_s[name] for name in later)

    def left(self) -> float:
        return self.deadline() - self.clock()

    def skip_reason(self, estimate_s: float) -> str | None:
        """Why an item estimated to take `estimate_s` must be skipped now, or None if it fits."""
        left = self.left()
        if estimate_s > left:
            return f"time guard: ~{estimate_s:.0f} s needed, {max(left, 0.0):.0f} s left in section {self.section}"
        return None


# --------------------------------------------------------------------------------------------------
# the report: one table, rewritten after every item


@dataclasses.dataclass
class Report:
    out_dir: str
    name: str
    settings: dict
    sections: dict = dataclasses.field(default_factory=lambda: {name: [] for name in SECTIONS})
    notes: dict = dataclasses.field(default_factory=dict)

    def add(self, section: str, row: dict) -> None:
        self.sections[section].append(row)
        print(f"[{section}] {_row_summary(row)}", flush=True)
        self.write()

    def write(self) -> str:
        payload = {
            "settings": self.settings,
            "versions": package_versions("jax", "jaxlib", "jax-cuda12-plugin", "flax", "optax", "torch", "diffusers"),
            "flops": FLOPS_NOTE,
            "notes": self.notes,
            "sections": self.sections,
        }
        return write_results(self.name, payload, render_markdown(self), directory=self.out_dir)


FLOPS_NOTE = {
    "attention": attention_bench.FLOPS_CONVENTION,
    "train_step": "model FLOPs = 6 x forward MACs per image, counted analytically (dit_forward_macs, "
    "forward_macs); XLA = compiled cost_analysis() (a scanned DiT's blocks count once there)",
    "peak": f"MFU against {PEAK_TFLOPS_H100:g} TFLOP/s dense bf16 (H100/H200 SXM)",
}


def _row_summary(row: dict) -> str:
    if "skipped" in row or "error" in row:
        what = {k: v for k, v in row.items() if k in ("implementation", "preset", "seq", "head_dim", "nfe", "mode")}
        return f"{what} {'skipped: ' + row['skipped'] if 'skipped' in row else 'error: ' + row['error'][:200]}"
    keys = (
        "implementation",
        "preset",
        "mode",
        "head_dim",
        "seq",
        "remat",
        "nfe",
        "forward_tflops",
        "fwd_bwd_tflops",
        "images_per_s",
        "mfu",
    )
    return ", ".join(f"{k}={_fmt(row[k])}" for k in keys if k in row)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _status(row: dict) -> str:
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    if "error" in row:
        return "error: " + row["error"][:160].replace("|", "/").replace("\n", " ")
    return "ok"


ATTENTION_HEADERS = ["implementation", "d", "seq", "batch", "heads", "fwd ms", "fwd TF/s", "f+b ms", "f+b TF/s"]
ATTENTION_HEADERS += ["max rel err", "status"]
TRAIN_HEADERS = ["model", "batch", "dtype", "remat", "scan", "compile s", "step ms", "images/s", "GFLOP/img"]
TRAIN_HEADERS += ["XLA/model", "TFLOP/s", "MFU", "status"]
TORCH_HEADERS = ["model", "mode", "batch", "params (M)", "first step s", "step ms", "images/s", "diffjax / torch"]
TORCH_HEADERS += ["status"]


def render_markdown(report: Report) -> str:
    env = environment()
    parts = [
        f"# Device check ({env['device']} x {env['device_count']}, {env['date']}, jax {env['versions']['jax']})",
        f"Settings: {report.settings}. FLOPs: {FLOPS_NOTE['attention']}; {FLOPS_NOTE['train_step']}; "
        f"{FLOPS_NOTE['peak']}.",
    ]
    parts += [f"Note ({key}): {value}" for key, value in report.notes.items()]
    s = report.sections
    parts.append("## Attention (bf16; TFLOP/s; max relative error of out, dq, dk, dv vs the f32 reference)")
    parts.append(
        markdown_table(
            ATTENTION_HEADERS,
            [
                [
                    r["implementation"],
                    r["head_dim"],
                    r["seq"],
                    r["batch"],
                    r["heads"],
                    _fmt(r.get("forward_ms")),
                    _fmt(r.get("forward_tflops")),
                    _fmt(r.get("fwd_bwd_ms")),
                    _fmt(r.get("fwd_bwd_tflops")),
                    _fmt(max(r["relative_error"].values()) if r.get("relative_error") else None, 2),
                    _status(r),
                ]
                for r in sorted(s["attention"], key=lambda r: (r["head_dim"], r["seq"], r["implementation"]))
            ],
        )
    )
    parts.append("## Train step (diffjax: loss, grad, AdamW, EMA; synthetic data)")
    parts.append(
        markdown_table(
            TRAIN_HEADERS,
            [
                [
                    r["preset"] + (" (tiny)" if r.get("model_changes") else ""),
                    r["batch"],
                    r.get("dtype", "-"),
                    r["remat"],
                    r.get("scan_layers"),
                    _fmt(r.get("compile_s")),
                    _fmt(1e3 * r["step_s"] if "step_s" in r else None),
                    _fmt(r.get("images_per_s")),
                    _fmt(r.get("model_gflops_per_image")),
                    _fmt(r.get("xla_to_model_flops")),
                    _fmt(r.get("achieved_tflops")),
                    _fmt(None if r.get("mfu") is None else 100 * r["mfu"]) + (" %" if r.get("mfu") else ""),
                    _status(r),
                ]
                for r in s["train_step"]
            ],
        )
    )
    parts.append("## The same DiT step in PyTorch (diffusers DiTTransformer2DModel, bf16 autocast)")
    parts.append(
        markdown_table(
            TORCH_HEADERS,
            [
                [
                    r.get("preset", "-"),
                    r.get("mode", "-"),
                    r.get("batch", "-"),
                    _fmt(r.get("params_M")),
                    _fmt(r.get("first_step_s")),
                    _fmt(1e3 * r["step_s"] if "step_s" in r else None),
                    _fmt(r.get("images_per_s")),
                    _fmt(r.get("diffjax_over_torch")),
                    _status(r),
                ]
                for r in s["torch_train_step"]
            ],
        )
    )
    parts.append("## sample() throughput (default solver, final denoising included, one jitted program)")
    parts.append(
        markdown_table(
            ["model", "batch", "NFE", "steps", "solver", "first call s", "seconds", "images/s", "status"],
            [
                [
                    r["preset"] + (" (tiny)" if r.get("model_changes") else ""),
                    r["batch"],
                    r["nfe"],
                    r.get("steps", "-"),
                    r.get("solver", "-"),
                    _fmt(r.get("first_call_s")),
                    _fmt(r.get("seconds")),
                    _fmt(r.get("images_per_s")),
                    _status(r),
                ]
                for r in s["sampling"]
            ],
        )
    )
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------
# sections


def _record_error(row: dict, err: BaseException) -> dict:
    traceback.print_exc()
    row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
    return row


def run_attention(plan: Plan, guard: TimeGuard, report: Report) -> None:
    estimates: dict[str, float] = {}
    for seq in plan.seqs:
        for head_dim in plan.head_dims:
            problem = attention_bench.Problem(
                batch=max(1, plan.tokens // seq),
                seq=seq,
                heads=max(1, plan.hidden // head_dim),
                head_dim=head_dim,
                dtype="bfloat16",
            )
            reference = None
            reason = guard.skip_reason(plan.attention_estimate_s)
            if reason is None:
                try:
                    reference = attention_bench.reference_values(*attention_bench.make_inputs(problem))
                except Exception as err:  # noqa: BLE001 -- measure the speed even without the check
                    report.notes[f"reference d={head_dim} seq={seq}"] = f"{type(err).__name__}: {str(err)[:200]}"
            for name in plan.attention_implementations:
                row_key = {"implementation": name, **dataclasses.asdict(problem)}
                reason = guard.skip_reason(estimates.get(name, plan.attention_estimate_s))
                if reason:
                    report.add("attention", {**row_key, "skipped": reason})
                    continue
                start = time.perf_counter()
                row = attention_bench.measure(
                    name,
                    attention_bench.BUILDERS[name],
                    problem,
                    interpret=plan.interpret,
                    warmup=plan.attention_warmup,
                    iters=plan.attention_iters,
                    reference=reference,
                    verbose=True,
                )
                if "skipped" not in row:
                    estimates[name] = time.perf_counter() - start
                report.add("attention", row)


def run_train_steps(plan: Plan, guard: TimeGuard, report: Report, peak: float | None) -> None:
    for spec in plan.train_rows:
        dtype = "bfloat16"
        key = {"preset": spec.preset, "batch": spec.batch, "dtype": dtype, "remat": spec.remat}
        key["scan_layers"] = spec.scan_layers
        reason = guard.skip_reason(spec.estimate_s)
        if reason:
            report.add("train_step", {**key, "skipped": reason})
            continue
        try:
            row = train_bench.measure(
                spec.preset,
                spec.batch,
                dtype,
                spec.remat,
                spec.scan_layers,
                plan.train_warmup,
                plan.train_steps,
                peak,
                dict(spec.model_changes),
            )
            row.pop("step_times_s", None)
        except Exception as err:  # noqa: BLE001 -- out of memory etc.: record it and go on
            row = _record_error(dict(key), err)
        report.add("train_step", row)


def torch_rows(plan: Plan, guard: TimeGuard, dry_run: bool, on_row: Callable = lambda rows: None) -> list[dict]:
    """The torch section's rows (run in a child process: see `run_torch_train_step`);
    `on_row(rows)` after each, so a child stopped from outside keeps what it measured."""
    base = {"preset": plan.torch_preset, "batch": plan.torch_batch}
    try:
        torch, _ = torch_peers.import_torch()
    except ImportError as err:
        return [{**base, "mode": "eager", "skipped": f"torch/diffusers not importable: {err}"}]
    device = "cpu" if dry_run else ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        return [{**base, "mode": "eager", "skipped": f"torch {torch.__version__} sees no CUDA device"}]
    cfg = models.get_config(plan.torch_preset, **dict(plan.torch_model_changes))
    autocast = torch.bfloat16 if device == "cuda" else None
    rows = []
    for mode in ("eager", "torch.compile"):
        row = {**base, "mode": mode, "device": device, "autocast": str(autocast), "torch": torch.__version__}
        row["model_changes"] = dict(plan.torch_model_changes)
        reason = guard.skip_reason(plan.torch_estimate_s * (2 if mode != "eager" else 1))
        if reason:
            rows.append({**row, "skipped": reason})
            on_row(rows)
            continue
        try:
            torch.manual_seed(0)
            model = torch_peers.diffusers_dit(cfg).to(device)
            forward = torch_peers.forward_of(model, conditional=True)
            if mode != "eager":
                forward = torch.compile(forward, backend=plan.torch_compile_backend)
                row["backend"] = plan.torch_compile_backend
            step = torch_peers.make_train_step(model, forward, device=device, autocast_dtype=autocast)
            h, w = cfg.hw
            x0 = torch.randn(plan.torch_batch, cfg.in_channels, h, w, device=device)
            y = torch.randint(0, cfg.num_classes, (plan.torch_batch,), device=device)
            timing = torch_peers.time_steps(step, x0, y, plan.train_warmup, plan.train_steps)
            timing.pop("step_times_s")
            row.update(timing, params_M=torch_peers.param_count(model) / 1e6)
            row["images_per_s"] = plan.torch_batch / row["step_s"]
            del model, step
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 -- torch.compile may not work here: record it
            row = _record_error(row, err)
        print(f"[torch_train_step] {_row_summary(row)}", flush=True)
        rows.append(row)
        on_row(rows)
    return rows


def run_torch_train_step(plan: Plan, guard: TimeGuard, dry_run: bool) -> list[dict]:
    """PyTorch runs in a child process that never touches the accelerator through JAX (JAX_PLATFORMS=cpu
    there): its CUDA libraries and memory pool stay apart from JAX's. Run first, before JAX holds the
    GPU's memory (this process has not initialized JAX's backend yet); the child has this section's
    budget and is stopped 30 s after it. Returns its rows."""
    budget = max(guard.left(), 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "torch_rows.json")
        command = [sys.executable, "-m", "experiments.device_check", "--torch-child", path, "--budget-s", str(budget)]
        command += ["--dry-run"] if dry_run else []
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            done = subprocess.run(command, env=env, cwd=root, timeout=budget + 30.0, check=False)
            problem = f"child exited {done.returncode}" if done.returncode else None
        except subprocess.TimeoutExpired:
            problem = f"child stopped after {budget + 30:.0f} s"
        rows = _read_json(path) or []
    if problem:
        rows.append({"preset": plan.torch_preset, "batch": plan.torch_batch, "mode": "-", "error": problem})
    return rows


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def torch_child(path: str, budget_s: float, dry_run: bool) -> None:
    plan = dry_plan() if dry_run else full_plan()
    guard = TimeGuard({"torch_train_step": budget_s}, ("torch_train_step",))
    guard.start("torch_train_step")
    torch_rows(plan, guard, dry_run, on_row=lambda rows: atomic_write_json(path, rows))


def diffjax_over_torch(report: Report) -> None:
    """images/s of our train step over torch's, for the same model and batch (remat none)."""
    for row in report.sections["torch_train_step"]:
        ours = next(
            (
                r
                for r in report.sections["train_step"]
                if r["preset"] == row.get("preset")
                and r.get("batch") == row.get("batch")
                and r.get("remat") == "none"
                and r.get("model_changes", {}) == row.get("model_changes", {})
                and "images_per_s" in r
            ),
            None,
        )
        if ours is not None and "images_per_s" in row:
            row["diffjax_over_torch"] = ours["images_per_s"] / row["images_per_s"]


def sample_throughput_fn(cfg, batch: int, nfe: int):
    """(jitted fn(params, key) -> samples, steps, params) for `sample()` with the default solver at
    `nfe` network evaluations (the final denoising included) of a random-weight `cfg` network."""
    model = models.build(cfg)
    apply, params = models.functional(model)
    process = P.VP()
    steps = nfe - 1  # both default solvers make one network call per step, plus the final denoising
    shape = (batch, *cfg.hw, cfg.in_channels)

    def draw(params, key):
        denoiser = Denoiser(lambda x, t: apply(params, x, t), process, "eps")
        return sample(denoiser, key, shape, steps=steps).samples

    return jax.jit(draw), steps, params


def run_sampling(plan: Plan, guard: TimeGuard, report: Report) -> None:
    cfg = models.get_config(plan.sample_preset, dtype="bfloat16", **dict(plan.sample_model_changes))
    for nfe in plan.sample_nfes:
        row = {"preset": plan.sample_preset, "batch": plan.sample_batch, "nfe": nfe}
        row["model_changes"] = dict(plan.sample_model_changes)
        reason = guard.skip_reason(plan.sample_estimate_s)
        if reason:
            report.add("sampling", {**row, "skipped": reason})
            continue
        try:
            fn, steps, params = sample_throughput_fn(cfg, plan.sample_batch, nfe)
            key = jax.random.key(0)
            start = time.perf_counter()
            out = jax.block_until_ready(fn(params, key))
            first = time.perf_counter() - start
            times = []
            for i in range(plan.sample_repeats):
                start = time.perf_counter()
                out = jax.block_until_ready(fn(params, jax.random.key(i + 1)))
                times.append(time.perf_counter() - start)
            seconds = float(np.median(times))
            row.update(
                steps=steps,
                solver=type(default_solver(steps)).__name__,
                first_call_s=first,
                seconds=seconds,
                images_per_s=plan.sample_batch / seconds,
                finite=bool(jnp.all(jnp.isfinite(out))),
            )
        except Exception as err:  # noqa: BLE001
            row = _record_error(row, err)
        report.add("sampling", row)


# --------------------------------------------------------------------------------------------------
# command line


def default_out_dir(dry_run: bool) -> str:
    return tempfile.mkdtemp(prefix="device_check_") if dry_run else RESULTS_DIR


def check_out_dir(out_dir: str, dry_run: bool) -> str:
    if dry_run and os.path.realpath(out_dir) == os.path.realpath(RESULTS_DIR):
        raise SystemExit(f"--dry-run must not write into {RESULTS_DIR}: pass another --out-dir")
    return out_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, every code path")
    p.add_argument("--out-dir", default=None, help="where the table goes (default: experiments/results)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--budget-s", type=float, default=None, help="total seconds for the sections (default: the plan's)")
    p.add_argument("--peak-tflops", type=float, default=None, help=f"per device (default {PEAK_TFLOPS_H100:g} on GPU)")
    p.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)  # internal: the PyTorch process
    return p.parse_args(argv)


def scaled_budgets(budgets_s: dict, total: float | None) -> dict:
    if total is None:
        return dict(budgets_s)
    scale = total / sum(budgets_s.values())
    return {name: seconds * scale for name, seconds in budgets_s.items()}


def main(argv=None) -> str | None:
    args = parse_args(argv)
    if args.torch_child:
        torch_child(args.torch_child, args.budget_s, args.dry_run)
        return None
    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
    plan = dry_plan() if args.dry_run else full_plan()
    out_dir = check_out_dir(args.out_dir or default_out_dir(args.dry_run), args.dry_run)
    budgets = scaled_budgets(plan.budgets_s, args.budget_s)
    sections = [name for name in SECTIONS if name in args.sections]
    guard = TimeGuard(budgets, tuple(sections))
    seconds = {}
    torch_section_rows = []
    if "torch_train_step" in sections:  # first: before JAX initializes the accelerator
        guard.start("torch_train_step")
        started = time.perf_counter()
        torch_section_rows = run_torch_train_step(plan, guard, args.dry_run)
        seconds["torch_train_step"] = round(time.perf_counter() - started, 1)
    device = jax.devices()[0]
    if not args.dry_run and device.platform == "cpu":
        print("device_check: no accelerator found; use --dry-run on a CPU", file=sys.stderr)
        raise SystemExit(2)
    peak = args.peak_tflops or (None if device.platform == "cpu" else PEAK_TFLOPS_H100)
    name = "device_check_" + ("dry_run" if args.dry_run else slug(device.device_kind))
    settings = {"dry_run": args.dry_run, "sections": sections, "budgets_s": budgets, "peak_tflops": peak}
    report = Report(out_dir, name, settings)
    report.notes["jvp"] = "the attention JVP is not measured: the kernels have no JVP yet"
    for row in torch_section_rows:
        report.add("torch_train_step", row)
    runners = {
        "attention": lambda: run_attention(plan, guard, report),
        "train_step": lambda: run_train_steps(plan, guard, report, peak),
        "sampling": lambda: run_sampling(plan, guard, report),
    }
    for section in sections:
        if section in runners:
            guard.start(section)
            started = time.perf_counter()
            runners[section]()
            seconds[section] = round(time.perf_counter() - started, 1)
        report.notes[f"{section} seconds"] = seconds[section]
    diffjax_over_torch(report)
    path = report.write()
    print(render_markdown(report))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
