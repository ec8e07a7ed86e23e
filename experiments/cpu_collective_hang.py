"""Whether JAX's CPU runtime deadlocks with several collective programs in flight on a split CPU.

    python -m experiments.cpu_collective_hang [--devices 2] [--trials 4] [--timeout 25]

Each trial is a fresh process with the CPU split into --devices devices that calls
`f = jax.jit(lambda v: jnp.mean(v ** 2))` 200 times on an array sharded over them (an all-reduce
per call), either waiting for each result before the next call or dispatching them all and waiting
at the end. A trial that has not finished after --timeout seconds is counted as hung and killed
(the runtime itself logs "may be stuck" after 20 s and aborts the process after 40 s more). The
trainer reads a value every step, so it never has two steps in flight; the README tells scripts on a
split CPU to wait likewise.
Writes experiments/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from experiments.benchmarks.common import REPO, cpu_process_environment, markdown_table, write_results

MODES = ("wait for each call", "all calls in flight")


def trial(mode: str) -> None:
    """One trial in this process (the parent has set the device count)."""
    import jax
    import jax.numpy as jnp

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = jax.device_put(jnp.ones((4 * jax.device_count(), 1000)), jax.NamedSharding(mesh, jax.P("data")))
    f = jax.jit(lambda v: jnp.mean(v**2))
    if mode == MODES[0]:
        outs = [jax.block_until_ready(f(x + i)) for i in range(200)]
    else:
        outs = jax.block_until_ready([f(x + i) for i in range(200)])
    print(f"finished {len(outs)} calls on {jax.device_count()} devices")


def run_trial(mode: str, devices: int, timeout: float) -> bool:
    """True when a fresh process ran the trial to its end within `timeout` seconds."""
    env = cpu_process_environment(JAX_NUM_CPU_DEVICES=str(devices))
    command = [sys.executable, "-m", "experiments.cpu_collective_hang", "--trial", mode]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    if done.returncode != 0 or f"on {devices} devices" not in done.stdout:
        raise RuntimeError(f"trial {mode!r} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=25.0, help="seconds before a trial counts as hung")
    parser.add_argument("--name", default="cpu_collective_hang")
    parser.add_argument("--trial", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        trial(args.trial)
        return
    if args.devices < 2 or args.trials < 1 or args.timeout <= 0:
        got = f"{args.devices}, {args.trials}, {args.timeout}"
        raise SystemExit(f"need --devices >= 2, --trials >= 1, --timeout > 0; got {got}")
    finished = {mode: [] for mode in MODES}
    for t in range(args.trials):  # the modes alternate, so that a load change hits both
        for mode in MODES:
            finished[mode].append(run_trial(mode, args.devices, args.timeout))
            print(f"trial {t + 1}, {mode}: {'finished' if finished[mode][-1] else 'hung'}", flush=True)
    rows = [[mode, f"{sum(ok)} of {len(ok)}", f"{len(ok) - sum(ok)} of {len(ok)}"] for mode, ok in finished.items()]
    markdown = "\n\n".join(
        [
            f"# 200 all-reducing calls on a CPU split into {args.devices} devices",
            f"`jax.jit(lambda v: jnp.mean(v ** 2))` on a sharded array, each trial a fresh process; "
            f"hung: not finished after {args.timeout:.0f} s.",
            markdown_table(["calls", "finished", "hung"], rows),
        ]
    )
    print(markdown)
    payload = {"devices": args.devices, "timeout_s": args.timeout, "finished": finished}
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
