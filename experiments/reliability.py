"""Fault injection: does a training run survive preemption, crashes, NaNs and damaged checkpoints?

    python -m experiments.reliability        # 20 sigterm, 20 + 10 sigkill, 4 nan, 6 corrupt: ~30 min on 2 cores
    python -m experiments.reliability --sigterm 2 --sigkill 2 --sigkill-sync 0 --nan 2 --corrupt 1 --no-write

Every trial trains configs/default.py through the CLI (experiments/main.py) in a fresh work directory
with a reduced model (MODEL_OVERRIDES: 8x8 digits, a two-level U-Net of width 8, so a trial takes
seconds on a CPU), NUM_STEPS steps, a checkpoint every CHECKPOINT_EVERY steps (asynchronous, the
default); injects one fault, restarts the CLI until the run finishes, and compares the final
checkpoint with an uninterrupted reference run. The persistent compilation cache
($JAX_COMPILATION_CACHE_DIR, default /tmp/diffjax-reliability-jax-cache) spares recompilation.

Scenarios:
  sigterm   SIGTERM at a random step; the run must finish the step, save and exit 0.
  sigkill   SIGKILL at a random moment of a checkpoint write: after orbax's <step>.orbax-checkpoint-tmp
            directory appears, within the shortest write time measured in the reference run. With
            asynchronous writes (the default) training goes on during the write, so the steps lost are
            bounded by the interval plus the steps trained while the killed write was in flight; with
            synchronous writes (train.async_checkpointing=False) by the interval.
  nan       NaN batches (train.inject_nonfinite_at): 3 isolated steps are skipped and counted; or
            K = max_consecutive_nonfinite steps in a row stop the run (exit 2 with a diagnostic),
            after which a restart completes.
  corrupt   a random array-data file of the newest checkpoint truncated, bit-flipped or deleted: reported
            with its step and the previous checkpoint used (the damaged one is not counted as lost), or,
            where the file is one restoring does not read, the same step restored exactly.

Columns: survived = the restarted run finished with every check of its scenario passing (sigterm,
sigkill, corrupt: final params, EMA, optimizer state, step and data position bit-identical to the
reference; nan: skipped steps counted, parameters finite); steps lost = steps computed before the
fault that had to be computed again (a trial fails beyond the bound); checkpoints lost = checkpoints
committed before the fault and newer than the one restored; data lost = trials whose data iterator
did not resume at the batch of the restored step.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from configs.default import get_config
from diffjax.training.load import restore_run
from experiments.benchmarks.common import environment, markdown_table, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_STEPS = 40
CHECKPOINT_EVERY = 10
MAX_CONSECUTIVE_NONFINITE = 3
TMP_SUFFIX = ".orbax-checkpoint-tmp"
MODEL_OVERRIDES = {  # the default experiment with a reduced model (as tests/test_training.py)
    "data.image_size": 8,
    "data.resize_method": "none",
    "model.overrides.model_channels": 8,
    "model.overrides.channel_mult": (1, 2),
    "model.overrides.attn_resolutions": (4,),
    "model.overrides.num_head_channels": 8,
    "model.overrides.norm_groups": 4,
}
RUN_OVERRIDES = {
    # constant learning rate: the scenarios resume with another train.num_steps, which a cosine
    # schedule (configs/default.py's) refuses
    "optim.schedule": "constant",
    "train.num_steps": NUM_STEPS,
    "train.checkpoint_every": CHECKPOINT_EVERY,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.max_consecutive_nonfinite": MAX_CONSECUTIVE_NONFINITE,
    "sample.num_samples": 8,
    "sample.steps": 3,
    "mesh.cpu_devices": 1,  # one CPU device: the scenarios are about checkpoints, not speed
}


def overrides(extra: dict | None = None) -> dict:
    return {**MODEL_OVERRIDES, **RUN_OVERRIDES, **(extra or {})}


def make_config(extra: dict | None = None):
    """The config the CLI builds from `overrides(extra)`."""
    config = get_config()
    for key, value in overrides(extra).items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


# ------------------------------------------------------------------------------------------------
# driving the CLI
# ------------------------------------------------------------------------------------------------


def environment_for_runs() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffjax-reliability-jax-cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def start(workdir: str, extra: dict | None = None) -> subprocess.Popen:
    """The CLI training in `workdir`, its output appended to workdir/../<name>.log."""
    flags = [f"--config.{k}={v}" for k, v in overrides(extra).items()]
    log = open(f"{workdir}.log", "a")
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "experiments", "main.py"), f"--workdir={workdir}", *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=environment_for_runs(),
    )


def wait(proc: subprocess.Popen, timeout: float = 600) -> int:
    return proc.wait(timeout=timeout)


def run_to_end(workdir: str, extra: dict | None = None) -> int:
    return wait(start(workdir, extra))


def output(workdir: str) -> str:
    with open(f"{workdir}.log") as f:
        return f.read()


def wait_until(predicate, proc: subprocess.Popen, poll: float, timeout: float = 600) -> bool:
    """Poll until predicate() (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the training run made no progress")


def last_logged_step(workdir: str) -> int:
    """The newest step in metrics.jsonl (log_every = 1: the steps completed)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return steps[-1] if steps else 0


def committed_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def unfinished_saves(workdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "checkpoints", f"*{TMP_SUFFIX}*")))


def write_windows(workdir: str, proc: subprocess.Popen) -> list[float]:
    """Seconds each checkpoint write of a run lasted (its temporary directory existed)."""
    seen = {}
    while proc.poll() is None:
        now = time.monotonic()
        for path in unfinished_saves(workdir):
            seen.setdefault(path, [now, now])[1] = now
        time.sleep(0.002)
    return [end - start for start, end in seen.values()]


def resumed_steps(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from the checkpoint at step (\d+)", text)]


# ------------------------------------------------------------------------------------------------
# checking a finished run
# ------------------------------------------------------------------------------------------------


def final_checkpoint(workdir: str, extra: dict | None = None):
    """(state as numpy leaves, data-iterator state, step) of the newest checkpoint in workdir,
    restored with the config stored in it (`extra` is not needed: kept for callers)."""
    del extra
    _, restored = restore_run(workdir)
    leaves = [np.asarray(x) for x in jax.tree.leaves(restored.state)]
    return leaves, restored.data_state, restored.step


def identical(a, b) -> bool:
    return (
        a[2] == b[2]
        and a[1] == b[1]
        and len(a[0]) == len(b[0])
        and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    )


def data_resumed(workdir: str) -> bool:
    """The final data position is the final step (one batch per step, none repeated or skipped)."""
    _, data_state, step = final_checkpoint(workdir)
    return data_state is not None and data_state.get("next_batch") == step


def record(scenario: str, **fields) -> dict:
    return {"scenario": scenario, **fields}


# ------------------------------------------------------------------------------------------------
# scenarios: one trial each, in a fresh workdir
# ------------------------------------------------------------------------------------------------


def sigterm_trial(workdir: str, rng: random.Random, reference) -> dict:
    target = rng.randint(1, NUM_STEPS - 1)
    proc = start(workdir)
    wait_until(lambda: last_logged_step(workdir) >= target, proc, poll=0.01)
    observed = last_logged_step(workdir)
    proc.send_signal(signal.SIGTERM)
    code = wait(proc)
    clean_exit = code == 0 and re.search(r"stopped by signal SIGTERM at step \d+; checkpoint saved", output(workdir))
    saved = committed_steps(workdir)
    finished = run_to_end(workdir) == 0
    restored = resumed_steps(output(workdir))[-1] if resumed_steps(output(workdir)) else 0
    final = final_checkpoint(workdir) if finished else None
    exact = final is not None and identical(final, reference)
    return record(
        "sigterm",
        signal_at_step=observed,
        exit_code=code,
        clean_exit=bool(clean_exit),
        saved_steps=saved,
        restored_step=restored,
        steps_lost=max(0, observed - restored),
        checkpoints_lost=sum(s > restored for s in saved),
        exact=exact,
        data_ok=exact and data_resumed(workdir),
        survived=bool(clean_exit) and finished and exact and restored >= observed,
    )


def sigkill_trial(workdir: str, rng: random.Random, reference, window: float, sync: bool) -> dict:
    """window: the shortest write of the reference run; the kill comes at a random moment of it.
    sync: synchronous checkpoint writes (training waits for them)."""
    save_step = rng.choice(range(CHECKPOINT_EVERY, NUM_STEPS, CHECKPOINT_EVERY))
    tmp = os.path.join(workdir, "checkpoints", f"{save_step}{TMP_SUFFIX}")
    extra = {"train.async_checkpointing": False} if sync else {}
    proc = start(workdir, extra)
    writing = wait_until(lambda: os.path.exists(tmp), proc, poll=0.002)
    delay = rng.uniform(0.0, window)
    if writing:
        time.sleep(delay)
    reached = last_logged_step(workdir)
    proc.send_signal(signal.SIGKILL)
    wait(proc)
    on_disk, left_over = committed_steps(workdir), unfinished_saves(workdir)
    finished = run_to_end(workdir, extra) == 0
    restored = resumed_steps(output(workdir))[-1] if resumed_steps(output(workdir)) else 0
    final = final_checkpoint(workdir) if finished else None
    exact = final is not None and identical(final, reference)
    # The bound: the interval, plus the steps trained while an asynchronous write was in flight.
    bounded = reached - restored <= CHECKPOINT_EVERY + max(0, reached - save_step)
    return record(
        f"sigkill ({'sync' if sync else 'async'} save)",
        save_step=save_step,
        kill_delay=round(delay, 3),
        killed_mid_write=writing and save_step not in on_disk and bool(left_over),
        killed_at_step=reached,
        committed_at_kill=on_disk,
        restored_step=restored,
        steps_lost=max(0, reached - restored),
        steps_during_write=max(0, reached - save_step),
        checkpoints_lost=sum(s > restored for s in on_disk),
        unfinished_left_after_restart=unfinished_saves(workdir),
        exact=exact,
        data_ok=exact and data_resumed(workdir),
        survived=finished and exact and bounded and not unfinished_saves(workdir),
    )


def nan_trial(workdir: str, rng: random.Random, reference, stop: bool) -> dict:
    if stop:  # K in a row: the run stops with a diagnostic at the K-th
        first = rng.randint(2, NUM_STEPS - MAX_CONSECUTIVE_NONFINITE)
        steps = tuple(range(first, first + MAX_CONSECUTIVE_NONFINITE))
    else:  # isolated NaN steps: skipped
        steps = tuple(sorted(rng.sample(range(1, NUM_STEPS + 1, 2), 3)))
    extra = {"train.inject_nonfinite_at": steps}
    code = run_to_end(workdir, extra)
    text = output(workdir)
    diagnosed = code == 2 and f"stopping at step {steps[-1]}: {len(steps)} consecutive steps with non-finite" in text
    stopped_at = committed_steps(workdir)[-1] if committed_steps(workdir) else 0
    finished = (run_to_end(workdir, extra) == 0) if stop else code == 0
    summary = json.load(open(os.path.join(workdir, "summary.json"))) if finished else {}
    final = final_checkpoint(workdir, extra) if finished else None
    finite = final is not None and all(np.all(np.isfinite(x)) for x in final[0] if x.dtype.kind == "f")
    counted = summary.get("skipped_steps") == len(steps)
    return record(
        "nan (stop after K)" if stop else "nan (skip)",
        injected_at=list(steps),
        exit_code=code,
        diagnosed=diagnosed if stop else None,
        stopped_at=stopped_at if stop else None,
        skipped_steps=summary.get("skipped_steps"),
        params_finite=finite,
        steps_lost=0,
        checkpoints_lost=0,
        data_ok=finished and data_resumed(workdir),
        survived=finished and finite and counted and (diagnosed if stop else True),
    )


def corrupt(step_dir: str, how: str, rng: random.Random) -> str:
    """Damage a committed checkpoint: truncate or bit-flip its largest data file, or delete one."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)]
    victim = rng.choice([f for f in files if os.sep + "d" + os.sep in f])  # array data (tensorstore ocdbt)
    size = os.path.getsize(victim)
    if how == "truncate":
        os.truncate(victim, size // 2)
    elif how == "bitflip":
        offset = rng.randrange(size)
        with open(victim, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    else:
        victim = rng.choice(files)
        os.remove(victim)
    return os.path.relpath(victim, step_dir)


def corrupt_trial(workdir: str, rng: random.Random, reference) -> dict:
    stop_at = NUM_STEPS - CHECKPOINT_EVERY
    run_to_end(workdir, {"train.num_steps": stop_at})
    before = committed_steps(workdir)
    how = rng.choice(["truncate", "bitflip", "delete"])
    victim = corrupt(os.path.join(workdir, "checkpoints", str(stop_at)), how, rng)
    finished = run_to_end(workdir) == 0
    text = output(workdir)
    reported = f"checkpoint at step {stop_at} cannot be restored" in text
    restored = resumed_steps(text)[-1] if resumed_steps(text) else 0
    final = final_checkpoint(workdir) if finished else None
    exact = final is not None and identical(final, reference)
    # Damage to a file that restoring does not read is harmless: the same step restores exactly.
    return record(
        "corrupt",
        damage=f"{how} {victim}",
        committed_before=before,
        reported=reported,
        restored_step=restored,
        steps_lost=stop_at - restored,
        checkpoints_lost=sum(restored < s < stop_at for s in before),
        exact=exact,
        data_ok=exact and data_resumed(workdir),
        survived=finished and exact and (reported and restored == stop_at - CHECKPOINT_EVERY or restored == stop_at),
    )


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def summarize(trials: list[dict]) -> list[dict]:
    rows = []
    for scenario in dict.fromkeys(t["scenario"] for t in trials):
        group = [t for t in trials if t["scenario"] == scenario]
        lost = [t["steps_lost"] for t in group]
        row = {
            "scenario": scenario,
            "trials": len(group),
            "survived": sum(bool(t["survived"]) for t in group),
            "steps_lost_max": max(lost),
            "steps_lost_mean": round(sum(lost) / len(lost), 2),
            "checkpoints_lost": sum(t["checkpoints_lost"] for t in group),
            "data_lost": sum(not t["data_ok"] for t in group),
        }
        row["bound"] = {"sigterm": "0", "corrupt": str(CHECKPOINT_EVERY)}.get(scenario, "0")
        if scenario == "corrupt":
            row["detected"] = sum(bool(t["reported"]) for t in group)
        if scenario.startswith("sigkill"):
            row["killed_mid_write"] = sum(bool(t["killed_mid_write"]) for t in group)
            row["steps_during_write_max"] = max(t["steps_during_write"] for t in group)
            row["bound"] = (
                str(CHECKPOINT_EVERY)
                if "sync" in scenario and "async" not in scenario
                else (f"{CHECKPOINT_EVERY} + steps during the write (here <= {row['steps_during_write_max']})")
            )
        rows.append(row)
    return rows


HEADERS = ["scenario", "trials", "survived", "steps lost (max / mean)", "bound", "checkpoints lost", "data lost"]


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        name = r["scenario"]
        if "killed_mid_write" in r:
            name += f", {r['killed_mid_write']} killed mid-write"
        if "detected" in r:
            name += f" ({r['detected']} detected, {r['trials'] - r['detected']} in bytes restoring does not read)"
        out.append(
            [
                name,
                r["trials"],
                r["survived"],
                f"{r['steps_lost_max']} / {r['steps_lost_mean']}",
                r["bound"],
                r["checkpoints_lost"],
                r["data_lost"],
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sigterm", type=int, default=20)
    parser.add_argument("--sigkill", type=int, default=20, help="trials with asynchronous writes (the default)")
    parser.add_argument("--sigkill-sync", type=int, default=10, help="trials with synchronous writes")
    parser.add_argument("--nan", type=int, default=4, help="trials; every other one stops after K in a row")
    parser.add_argument("--corrupt", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--no-write", action="store_true", help="do not write experiments/results/")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    root = args.workdir or tempfile.mkdtemp(prefix="diffjax-reliability-")
    os.makedirs(root, exist_ok=True)
    started = time.perf_counter()
    reference_dir = os.path.join(root, "reference")
    shutil.rmtree(reference_dir, ignore_errors=True)
    proc = start(reference_dir)
    windows = write_windows(reference_dir, proc)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{output(reference_dir)[-3000:]}")
    reference = final_checkpoint(reference_dir)
    print(
        f"reference run: {time.perf_counter() - started:.0f} s; checkpoint writes of "
        f"{', '.join(f'{w:.2f}' for w in windows)} s",
        flush=True,
    )

    plan = (
        [("sigterm", lambda w: sigterm_trial(w, rng, reference))] * args.sigterm
        + [("sigkill", lambda w: sigkill_trial(w, rng, reference, min(windows), sync=False))] * args.sigkill
        + [("sigkill-sync", lambda w: sigkill_trial(w, rng, reference, min(windows), sync=True))] * args.sigkill_sync
        + [(f"nan{i}", lambda w, stop=i % 2 == 1: nan_trial(w, rng, reference, stop)) for i in range(args.nan)]
        + [("corrupt", lambda w: corrupt_trial(w, rng, reference))] * args.corrupt
    )
    trials = []
    for i, (name, trial) in enumerate(plan):
        workdir = os.path.join(root, f"{i:03d}-{name}")
        shutil.rmtree(workdir, ignore_errors=True)
        t0 = time.perf_counter()
        result = trial(workdir)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        trials.append(result)
        print(json.dumps(result, default=str), flush=True)
        if result["survived"]:
            shutil.rmtree(workdir, ignore_errors=True)
            os.remove(f"{workdir}.log")

    rows = summarize(trials)
    env = environment()
    title = (
        f"Fault injection on configs/default.py with a reduced model "
        f"({', '.join(f'{k}={v}' for k, v in MODEL_OVERRIDES.items())}), {NUM_STEPS} steps, a checkpoint every "
        f"{CHECKPOINT_EVERY} (written asynchronously unless noted), nan: K = {MAX_CONSECUTIVE_NONFINITE}; "
        f"{env['device']} x{env['device_count']}, jax {env['versions']['jax']}, {env['date']}"
    )
    table = markdown_table(HEADERS, table_rows(rows))
    print("\n" + title + "\n\n" + table)
    if not args.no_write:
        notes = __doc__.split("Columns:")[1].strip()
        markdown = f"# Reliability\n\n{title}\n\n{table}\n\nColumns: {notes}\n"
        path = write_results(
            "reliability",
            {
                "settings": {
                    "num_steps": NUM_STEPS,
                    "checkpoint_every": CHECKPOINT_EVERY,
                    "write_seconds": windows,
                    "max_consecutive_nonfinite": MAX_CONSECUTIVE_NONFINITE,
                    "seed": args.seed,
                    "overrides": overrides(),
                },
                "rows": rows,
                "trials": trials,
                "seconds": round(time.perf_counter() - started),
            },
            markdown,
        )
        print(f"wrote {path}")
    if args.workdir is None and all(t["survived"] for t in trials):
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
