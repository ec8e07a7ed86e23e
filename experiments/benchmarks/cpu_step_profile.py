"""Where a CPU train step spends its time: the compiled `unet-small` step of cpu_vs_torch (eps-MSE,
AdamW, EMA, batch 32, float32) is profiled over a few steps with `jax.profiler`, and every executed
XLA op (a fusion, a library call) is put in one class by the instructions it computes: convolution
(split into kernel gradients, whose output has the kernel's shape, and the rest: forward and input
gradients), dot, reduce, data movement (transposes, copies, slices, concatenations, pads),
elementwise, and unclassified (traced ops the HLO text did not explain). Prints and writes the time
per class and the slowest ops with their output shapes.

    python -m experiments.benchmarks.cpu_step_profile [--steps 5] [--name cpu_step_profile]

The classes come from the optimized HLO text (`compiled.as_text()`), so they follow XLA's own op
names; a machine shared with other jobs inflates all times alike.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np

from experiments.benchmarks.common import markdown_table, write_results
from experiments.benchmarks.cpu_vs_torch import jax_train_config

CLASSES = (
    "convolution: kernel gradient",
    "convolution: other",
    "dot",
    "reduce",
    "data movement",
    "elementwise",
    "unclassified",
)
# lazy shape: tuple shapes such as (f32[2]{0}, f32[3]{0}) contain spaces
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_PLUMBING = {"parameter", "constant", "tuple", "get-tuple-element"}
_MOVEMENT = {
    "transpose", "copy", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
    "concatenate", "pad", "reverse", "iota",
}  # fmt: skip
_OP_NAME = re.compile(r"^[a-z][\w\-]*(\.\d+)?$")  # how XLA names the ops it runs (fusion.12, ynn_fusion.3)


def hlo_computations(text: str) -> dict[str, list[tuple[str, str, str, str | None]]]:
    """{computation name: [(instruction, output shape, opcode, called computation or None), ...]} of an
    HLO module's text."""
    computations, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            current.append((match.group(1), match.group(2), match.group(3), calls.group(1) if calls else None))
    return computations


def _is_kernel_gradient(conv_shape: str) -> bool:
    """A convolution whose output is (out, k, k, in)-like: XLA's layout of a kernel gradient for the
    1x1 and 3x3 windows of these models (a shape rule: forward outputs here are at least 4x4)."""
    dims = [int(d) for d in re.findall(r"\d+", conv_shape[conv_shape.index("[") : conv_shape.index("]")])]
    return len(dims) == 4 and dims[1] == dims[2] and dims[1] in (1, 3) and dims[0] > dims[1]


def classify(text: str) -> dict[str, tuple[str, str]]:
    """{op name: (class, output shape)} for every instruction of the module (fusions by their body)."""
    computations = hlo_computations(text)
    result = {}
    for instructions in computations.values():
        for name, shape, opcode, called in instructions:
            body = [(s, o) for _, s, o, _ in computations.get(called, [])] if called else [(shape, opcode)]
            opcodes = {o for _, o in body} - _PLUMBING
            if not opcodes:
                result[name] = ("unclassified", shape)  # a call whose body was not parsed
            elif "convolution" in opcodes:
                conv_shape = next(s for s, o in body if o == "convolution")
                kind = "convolution: kernel gradient" if _is_kernel_gradient(conv_shape) else "convolution: other"
                result[name] = (kind, conv_shape)
            elif "dot" in opcodes:
                result[name] = ("dot", shape)
            elif opcodes & {"reduce", "reduce-window"}:
                result[name] = ("reduce", shape)
            elif opcodes <= _MOVEMENT:
                result[name] = ("data movement", shape)
            else:
                result[name] = ("elementwise", shape)
    return result


def build_step(batch: int = 32):
    """The jitted unet-small train step of cpu_vs_torch at `batch`, its state and a batch of data."""
    from diffjax.data import dataset_info
    from diffjax.training.from_config import mesh_from_config
    from diffjax.training.run import build_run, init_state, make_jitted_train_step

    config = jax_train_config("unet-small", batch)
    run = build_run(config, dataset_info(config.data), mesh_from_config(config))
    step, state = make_jitted_train_step(run), init_state(run)
    rng = np.random.default_rng(0)
    data = {
        "image": jax.numpy.asarray(rng.standard_normal((batch, *run.image_shape), dtype=np.float32)),
        "label": jax.numpy.zeros((batch,), jax.numpy.int32),
    }
    return step, state, data


def op_times(step, state, data, steps: int) -> dict[str, float]:
    """Mean seconds per step of every traced event name over `steps` profiled steps."""
    for _ in range(2):
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = step(state, data)
                jax.block_until_ready(metrics)
        (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0) * 1e-6 / steps
    return dict(totals)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--name", default="cpu_step_profile")
    args = parser.parse_args(argv)
    step, state, data = build_step()
    classes = classify(step.lower(state, data).compile().as_text())
    times = op_times(step, state, data, args.steps)
    ops = [
        (seconds, name, *classes.get(name, ("unclassified", "?")))
        for name, seconds in times.items()
        if name in classes or _OP_NAME.match(name)
    ]
    per_class = collections.Counter()
    counts = collections.Counter()
    for seconds, _, kind, _ in ops:
        per_class[kind] += seconds
        counts[kind] += 1
    total = sum(per_class.values())
    class_rows = [
        [kind, counts[kind], f"{per_class[kind] * 1e3:.1f}", f"{100 * per_class[kind] / total:.1f}"] for kind in CLASSES
    ]
    class_rows.append(["all ops", sum(counts.values()), f"{total * 1e3:.1f}", "100.0"])
    slowest = sorted(ops, reverse=True)[:15]
    slow_rows = [[name, kind, shape, f"{seconds * 1e3:.2f}"] for seconds, name, kind, shape in slowest]
    markdown = "\n\n".join(
        [
            "# Where the unet-small CPU train step spends its time (batch 32, float32, per step)",
            markdown_table(["class", "ops per step", "ms per step", "%"], class_rows),
            "Slowest ops:",
            markdown_table(["op", "class", "output shape", "ms per step"], slow_rows),
        ]
    )
    print(markdown)
    payload = {
        "steps": args.steps,
        "per_class_s": dict(per_class),
        "ops_per_class": dict(counts),
        "slowest_ops": [
            {"name": n, "class": k, "shape": s, "seconds": t} for t, n, k, s in sorted(ops, reverse=True)[:100]
        ],
    }
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
