"""Where a CPU train step spends its time: the compiled `unet-small` step of cpu_vs_torch (eps-MSE,
AdamW, EMA, batch 32, float32) is profiled over a few steps with `jax.profiler`, and every executed
XLA op (a fusion, a library call) is put in one class by the instructions it computes: convolution
(split into kernel gradients, whose output has the kernel's shape, and the rest: forward and input
gradients), dot, reduce, transpose/copy, elementwise. Prints and writes the time per class and the
slowest ops with their output shapes.

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

CLASSES = ("convolution: kernel gradient", "convolution: other", "dot", "reduce", "transpose/copy", "elementwise")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", re.M)


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


def classify(text: str) -> dict[str, tuple[str, str]]:
    """{op name: (class, output shape)} for every instruction of the module (fusions by their body)."""
    computations = hlo_computations(text)
    result = {}
    for instructions in computations.values():
        for name, shape, opcode, called in instructions:
            body = [(s, o) for _, s, o, _ in computations.get(called, [])] if called else [(shape, opcode)]
            opcodes = {o for _, o in body}
            if "convolution" in opcodes:
                conv_shape = next(s for s, o in body if o == "convolution")
                dims = [int(d) for d in re.findall(r"\d+", conv_shape[conv_shape.index("[") : conv_shape.index("]")])]
                # a kernel gradient's output is (out, k, k, in)-like: the 1x1 and 3x3 windows of these models
                kernel = len(dims) == 4 and dims[1] == dims[2] and dims[1] in (1, 3) and dims[0] > dims[1]
                result[name] = ("convolution: kernel gradient" if kernel else "convolution: other", conv_shape)
            elif "dot" in opcodes:
                result[name] = ("dot", shape)
            elif opcodes & {"reduce", "reduce-window"}:
                result[name] = ("reduce", shape)
            elif opcodes & {"transpose", "copy"} and opcodes <= {"transpose", "copy", "parameter", "bitcast"}:
                result[name] = ("transpose/copy", shape)
            else:
                result[name] = ("elementwise", shape)
    return result


def build_step():
    from diffjax.data import dataset_info
    from diffjax.training.from_config import mesh_from_config
    from diffjax.training.run import build_run, init_state, make_jitted_train_step

    config = jax_train_config("unet-small", 32)
    run = build_run(config, dataset_info(config.data), mesh_from_config(config))
    step, state = make_jitted_train_step(run), init_state(run)
    rng = np.random.default_rng(0)
    data = {
        "image": jax.numpy.asarray(rng.standard_normal((32, *run.image_shape), dtype=np.float32)),
        "label": jax.numpy.zeros((32,), jax.numpy.int32),
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
    ops = [(seconds, name, *classes[name]) for name, seconds in times.items() if name in classes]
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
        "ops": [{"name": n, "class": k, "shape": s, "seconds": t} for t, n, k, s in sorted(ops, reverse=True)],
    }
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
