"""diffjax against PyTorch on the CPU, the machine users start on: same model sizes, same batch, same
loss, interleaved rounds.

Tasks
  unet    our `unet-small` (16x16x1, as configs/default.py: 1 residual block per level) against a
          diffusers UNet2DModel with the same levels, channels, blocks, attention and groups
          (torch_peers.diffusers_unet; parameter counts of both are reported), batch 32.
  dit     our DiT-S/2 against diffusers' DiTTransformer2DModel of the same sizes on 32x32x4
          latents, batch 8, class-conditional (diffusers' DiT has a time/label embedding per block:
          more parameters, the same per-token work).
  sample  10 network evaluations on batch 64 of the unet-small network: our jitted `sample()`
          (DDIM, eta 0, on the 1000-step DDPM chain, no final denoising) against a diffusers-style
          Python loop (DDIMScheduler.set_timesteps(10), unet(x, t), scheduler.step) under no_grad.
          Our batch is sharded over all devices: one, unless a variant splits the CPU
          (XLA_FLAGS=--xla_force_host_platform_device_count=2, as mesh.cpu_devices does).
  inception  FID's feature extraction (diffjax.evaluation.extract_features, 28x28x1 images resized
          to 299x299) on batch 25: diffjax only, for its variants (e.g. the host allocator).
Training step on both sides: eps-prediction MSE, AdamW (lr 1e-4, no weight decay, no clipping),
EMA 0.999, float32 (our step: diffjax.training's, built from configs/default.py with these
settings; torch's: torch_peers.make_train_step). PyTorch runs eager and under torch.compile.

Every contestant is its own process (so its peak RSS is its own), started one after the other;
then R rounds, each timing K steps of every contestant in turn (the order rotates per round). The
machine is shared with other jobs: interleaving puts every contestant under the same load in each
round, so the per-round ratios are fair even when absolute numbers are not. Reported: images/s
(median over rounds), ratio diffjax / torch per round (median, min-max), time to the first step
(its own: jit compile, eager warm-up, torch.compile) and from process start, peak RSS (VmHWM).
2 threads each side: torch.set_num_threads(2); XLA's CPU thread pool has one thread per core, and
the machine this was written for has 2 cores.

    python -m experiments.benchmarks.cpu_vs_torch [--tasks unet,dit,sample] [--rounds 10] [--name cpu_vs_torch]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

START = time.time()

THREADS = 2
TREE = "TREE"  # a variant's variable naming the checkout its worker runs in
TASKS = ("unet", "dit", "sample", "inception")
SETTINGS = {  # task -> (batch, steps per round, default rounds)
    "unet": (32, 5, 10),
    "dit": (8, 2, 6),
    "sample": (64, 1, 8),
    "inception": (25, 1, 6),
}
CONTESTANTS = {"unet": ("diffjax", "torch", "torch.compile"), "dit": ("diffjax", "torch", "torch.compile")}
CONTESTANTS["sample"] = ("diffjax", "torch")
CONTESTANTS["inception"] = ("diffjax",)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------------
# diffjax side


def jax_train_config(preset: str, batch: int):
    """configs/default.py's run (or the DiT benchmark config) with eps-MSE, AdamW without clipping or
    weight decay, EMA 0.999 and no warm-up: the step the torch side runs."""
    import configs.default
    from experiments.benchmarks.train_step import benchmark_config

    if preset == "unet-small":
        config = configs.default.get_config()
        config.process.name = "vp"
        config.loss.time_sampler = "uniform"
        config.loss.sigma_data = 0.5
    else:
        config = benchmark_config(preset, batch, "float32", "none", True)
        config.train.label_dropout = 0.0
    config.loss.prediction = "eps"
    config.loss.weighting = "constant"
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 0.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.train.batch_size = batch
    config.train.ema_decay = 0.999
    config.train.ema_warmup = False
    return config


def jax_train_worker(task: str):
    import jax
    import numpy as np

    from diffjax.data import dataset_info
    from diffjax.training.from_config import mesh_from_config
    from diffjax.training.run import build_run, init_state, make_jitted_train_step
    from experiments.benchmarks.train_step import synthetic_data_info

    batch = SETTINGS[task][0]
    preset = "unet-small" if task == "unet" else "DiT-S/2"
    config = jax_train_config(preset, batch)
    info = dataset_info(config.data) if preset == "unet-small" else synthetic_data_info(preset)
    run = build_run(config, info, mesh_from_config(config))
    step = make_jitted_train_step(run)
    state = init_state(run)
    rng = np.random.default_rng(0)
    data = {
        "image": jax.numpy.asarray(rng.standard_normal((batch, *run.image_shape), dtype=np.float32)),
        "label": jax.numpy.asarray(rng.integers(0, max(run.spec.num_classes, 1), batch, dtype=np.int32)),
    }
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    return one, run.spec.num_params


def jax_sample_worker():
    import jax

    from diffjax import models
    from diffjax import processes as P
    from diffjax.denoisers import Denoiser
    from diffjax.samplers import DDIM, sample

    model = models.create("unet-small", num_res_blocks=1)
    apply, params = models.functional(model)
    process = P.DiscreteVP.from_betas(jax.numpy.linspace(1e-4, 0.02, 1000))
    batch = SETTINGS["sample"][0]
    # the batch split over every device, as the command line samples (one device unless the CPU is split)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @functools.partial(jax.jit, out_shardings=batch_sharding)
    def draw(params, key):
        denoiser = Denoiser(lambda x, t: apply(params, x, t), process, "eps")
        return sample(denoiser, key, (batch, 16, 16, 1), solver=DDIM(), steps=10, denoise_final=False).samples

    counter = [0]

    def one():
        counter[0] += 1
        jax.block_until_ready(draw(params, jax.random.key(counter[0])))

    return one, models.param_count(params)


def jax_inception_worker():
    import jax
    import numpy as np

    from diffjax.evaluation import extract_features, load_inception_params

    params = load_inception_params()
    images = np.random.default_rng(0).random((SETTINGS["inception"][0], 28, 28, 1), dtype=np.float32)

    def one():
        extract_features(params, images, value_range=(0.0, 1.0), batch_size=len(images), progress=False)

    return one, sum(x.size for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------------
# torch side


def torch_train_worker(task: str, compiled: bool):
    from diffjax import models
    from experiments.benchmarks import torch_peers

    torch, _ = torch_peers.import_torch()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    batch = SETTINGS[task][0]
    if task == "unet":
        cfg = models.get_config("unet-small", num_res_blocks=1)
        model = torch_peers.diffusers_unet(cfg)
    else:
        cfg = models.get_config("DiT-S/2")
        model = torch_peers.diffusers_dit(cfg)
    conditional = task == "dit"
    forward = torch_peers.forward_of(model, conditional)
    if compiled:
        forward = torch.compile(forward)
    step = torch_peers.make_train_step(model, forward).step
    h, w = cfg.hw
    x0 = torch.randn(batch, cfg.in_channels, h, w)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,))
    return lambda: step(x0, y), torch_peers.param_count(model)


def torch_sample_worker():
    from diffjax import models
    from experiments.benchmarks import torch_peers

    torch, diffusers = torch_peers.import_torch()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = torch_peers.diffusers_unet(models.get_config("unet-small", num_res_blocks=1)).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=False)
    scheduler.set_timesteps(10)
    batch = SETTINGS["sample"][0]

    @torch.no_grad()
    def one():
        x = torch.randn(batch, 1, 16, 16)
        for t in scheduler.timesteps:
            eps = model(x, t).sample
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return one, torch_peers.param_count(model)


def make_worker(task: str, contestant: str):
    if task == "inception":
        return jax_inception_worker()
    if task == "sample":
        return jax_sample_worker() if contestant == "diffjax" else torch_sample_worker()
    if contestant == "diffjax":
        return jax_train_worker(task)
    return torch_train_worker(task, compiled=contestant == "torch.compile")


def worker(task: str, contestant: str) -> None:
    """Set up, time the first step, then answer "N" (time N steps) and "rss" (peak RSS, the cores
    busy while timing: CPU time over wall time, and the share of the timed steps' CPU time spent in
    the kernel) on stdin."""
    malloc = os.environ.get("DIFFJAX_CPU_MALLOC", "")
    if malloc not in ("", "tune"):
        raise SystemExit(f"DIFFJAX_CPU_MALLOC={malloc!r}: must be 'tune' or unset")
    if malloc == "tune":  # as the command line does, before JAX starts
        from diffjax.training.cpu_malloc import tune_cpu_malloc

        print(tune_cpu_malloc(), file=sys.stderr)
    one, params = make_worker(task, contestant)
    cpu = {"user": 0.0, "system": 0.0, "wall": 0.0}
    start = time.perf_counter()
    one()
    first = time.perf_counter() - start
    reply = {"first_step_s": first, "process_to_first_step_s": time.time() - START, "params": params}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "rss":
            busy = cpu["user"] + cpu["system"]
            usage = {"system_cpu_share": cpu["system"] / max(busy, 1e-9), "cores_busy": busy / max(cpu["wall"], 1e-9)}
            print(json.dumps({"peak_rss_mib": peak_rss_mib(), **usage}), flush=True)
            continue
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(int(command)):
            start = time.perf_counter()
            one()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu["user"] += after.ru_utime - before.ru_utime
        cpu["system"] += after.ru_stime - before.ru_stime
        cpu["wall"] += sum(times)
        print(json.dumps({"times": times}), flush=True)


# --------------------------------------------------------------------------------------------------
# the parent: interleaved rounds


class Contestant:
    """A worker process; `environment` (a variant's XLA_FLAGS, LD_PRELOAD, DIFFJAX_CPU_MALLOC) is added
    to its environment, which otherwise has none of these three. A variant's TREE runs the worker in
    that checkout, with its code."""

    def __init__(self, task: str, name: str, environment: dict | None = None):
        from experiments.benchmarks.common import REPO

        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "JAX_PLATFORMS": "cpu"}
        for variable in ("XLA_FLAGS", "LD_PRELOAD", "DIFFJAX_CPU_MALLOC"):
            env.pop(variable, None)
        env.update({k: v for k, v in (environment or {}).items() if k != TREE})
        tree = (environment or {}).get(TREE, REPO)  # the worker's directory comes first on its sys.path
        kind = name.split(" ")[0]
        command = [sys.executable, "-m", "experiments.benchmarks.cpu_vs_torch", "--worker", task, kind]
        self.name = name
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        self.process = subprocess.Popen(command, cwd=tree, env=env, text=True, **pipes)
        self.startup = None

    def wait_ready(self) -> dict:
        self.startup = self._read()
        return self.startup

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} worker exited ({self.process.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def task_contestants(task: str, names=None, variants: dict | None = None) -> list[tuple[str, dict]]:
    """[(name, environment)] of a task: `names` (default: CONTESTANTS[task]), then the `variants` of
    its contestants."""
    entries = [(name, {}) for name in (names or CONTESTANTS[task])]
    return entries + [(n, env) for n, env in (variants or {}).items() if n.split(" ")[0] in CONTESTANTS[task]]


def run_task(
    task: str,
    rounds: int,
    names=None,
    variants: dict | None = None,
    parallel_start: bool = False,
    baseline: str = "diffjax",
) -> dict:
    """Interleaved rounds of `names` (default: CONTESTANTS[task]) and of `variants` ({"<contestant>
    <label>": {variable: value}}: that contestant with these environment variables); every
    contestant's per-round ratio is `baseline`'s images/s over its own. `parallel_start` starts every
    process at once (quicker; their first-step times then overlap and are not comparable)."""
    batch, steps, _ = SETTINGS[task]
    contestants = []
    entries = task_contestants(task, names, variants)
    try:
        for name, environment in entries:
            contestants.append(Contestant(task, name, environment))
            if not parallel_start:
                print(f"{task}: {name} ready {contestants[-1].wait_ready()}", flush=True)
        for c in contestants if parallel_start else ():
            print(f"{task}: {c.name} ready {c.wait_ready()}", flush=True)
        per_round = {c.name: [] for c in contestants}
        for r in range(rounds):
            order = contestants[r % len(contestants) :] + contestants[: r % len(contestants)]
            for c in order:
                per_round[c.name].append(batch / statistics.median(c.ask(str(steps))["times"]))
            print(f"{task} round {r}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in per_round.items()), flush=True)
        usage = {c.name: c.ask("rss") for c in contestants}
    finally:
        for c in contestants:
            c.close()
    result = {"batch": batch, "steps_per_round": steps, "rounds": rounds, "baseline": baseline, "contestants": {}}
    result["variant_environment"] = {name: environment for name, environment in entries if environment}
    for c in contestants:
        ratios = [j / t for j, t in zip(per_round[baseline], per_round[c.name])]
        result["contestants"][c.name] = {
            **c.startup,
            "images_per_s_per_round": per_round[c.name],
            "images_per_s": statistics.median(per_round[c.name]),
            "baseline_over_this": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            **usage[c.name],
        }
    return result


def render(results: dict) -> str:
    from experiments.benchmarks.common import markdown_table

    baselines = {result["baseline"] for result in results.values()}
    headers = [
        "task",
        "contestant",
        "params",
        "images/s (median)",
        f"{' / '.join(sorted(baselines))} / this: median (min-max)",
    ]
    headers += ["first step s", "process start to first step s", "peak RSS MiB", "kernel share of CPU time"]
    headers += ["cores busy"]
    rows = []
    for task, result in results.items():
        for name, c in result["contestants"].items():
            ratio = c["baseline_over_this"]
            rows.append(
                [
                    f"{task} (batch {result['batch']})",
                    name,
                    f"{c['params']:,}",
                    f"{c['images_per_s']:.1f}",
                    "-"
                    if name == result["baseline"]
                    else f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})",
                    f"{c['first_step_s']:.1f}",
                    f"{c['process_to_first_step_s']:.1f}",
                    f"{c['peak_rss_mib']:.0f}",
                    f"{100 * c['system_cpu_share']:.0f} %" if "system_cpu_share" in c else "-",
                    f"{c['cores_busy']:.2f}" if "cores_busy" in c else "-",
                ]
            )
    return markdown_table(headers, rows)


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """["[contestant/]label:VARIABLE=VALUE", ...] -> {"<contestant> <label>": {VARIABLE: VALUE, ...}}
    (contestant default: diffjax)."""
    variants: dict[str, dict[str, str]] = {}
    kinds = {kind for names in CONTESTANTS.values() for kind in names}
    for spec in specs:
        label, _, assignment = spec.partition(":")
        kind, _, label = label.rpartition("/")
        kind = kind or "diffjax"
        variable, equals, value = assignment.partition("=")
        if not label or not variable or not equals or kind not in kinds or " " in label:
            raise SystemExit(
                f"--variant must look like [contestant/]label:VARIABLE=VALUE with a contestant of "
                f"{sorted(kinds)} and a label without spaces, got {spec!r}"
            )
        if variable == TREE and not os.path.isfile(os.path.join(value, "experiments", "benchmarks", "cpu_vs_torch.py")):
            raise SystemExit(f"--variant {spec!r}: {value!r} is not a checkout of this repository")
        variants.setdefault(f"{kind} {label}", {})[variable] = value
    return variants


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--rounds", type=int, default=None, help="default: per task (unet 10, dit 6, sample 8)")
    parser.add_argument("--name", default="cpu_vs_torch", help="results/<name>.{json,md}")
    parser.add_argument("--note", default="", help="a line above the table")
    parser.add_argument("--contestants", default=None, help="comma-separated subset of diffjax,torch,torch.compile")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="[contestant/]label:VARIABLE=VALUE: one more contestant (default diffjax; shown as "
        '"<contestant> <label>") with this environment variable, e.g. '
        "torch/tcmalloc:LD_PRELOAD=libtcmalloc_minimal.so.4, onednn:XLA_FLAGS=--xla_cpu_use_onednn=true, "
        "tuned:DIFFJAX_CPU_MALLOC=tune (diffjax.training.cpu_malloc); repeat a label to set several variables; "
        "TREE=<path> runs that contestant from another checkout (e.g. `git worktree add /tmp/before HEAD~1`), "
        "to compare commits in the same rounds",
    )
    parser.add_argument(
        "--parallel-start", action="store_true", help="start all processes at once (first-step times overlap)"
    )
    parser.add_argument(
        "--baseline",
        default="diffjax",
        help='the contestant the ratios are against (a variant by its shown name, e.g. "diffjax tcmalloc")',
    )
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    from experiments.benchmarks.common import write_results

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {TASKS}")
    names = args.contestants.split(",") if args.contestants else None
    variants = parse_variants(args.variant)
    chosen_per_task = {task: [n for n in names if n in CONTESTANTS[task]] if names else None for task in tasks}
    for task, chosen in chosen_per_task.items():
        if args.baseline not in [name for name, _ in task_contestants(task, chosen, variants)]:
            raise SystemExit(
                f"--baseline {args.baseline!r} is not a contestant of task {task!r} (the ratios are against it)"
            )
    results = {}
    # the table is rewritten after every task: a stopped run keeps the finished ones
    for task, chosen in chosen_per_task.items():
        rounds = args.rounds or SETTINGS[task][2]
        results[task] = run_task(task, rounds, chosen, variants, args.parallel_start, args.baseline)
        markdown = "\n\n".join(
            x
            for x in (
                "# diffjax vs PyTorch on CPU (float32, 2 threads each side, interleaved rounds, separate processes)",
                args.note,
                render(results),
            )
            if x
        )
        payload = {"threads": THREADS, "settings": SETTINGS, "results": results}
        print(markdown)
        print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
