"""Sampler suite: every solver x grid on exact problems we did not design, side by side with diffusers.

Problems (experiments/benchmarks/exact_problems.py): power-law Gaussians in random bases, the ideal
denoiser of real image sets (MNIST, Fashion-MNIST, CIFAR-10, 8x8 digits), Gaussian mixtures at several
scales, separations and anisotropies. Each is sampled under the 1000-step DDPM chain (linear betas
1e-4..0.02, the process diffusers' schedulers assume), and a subset under every other process family
(VP, cosine, EDM, flow matching).

Every run starts from the same noise z: x_T = sigma(t_max) z, integrates to t_min and ends with the
final denoising D(x, t_min) (NFE counts every network call, that one included). The answer it is
compared with is the exact probability-flow solution from that x_T, denoised the same way: closed-form
for Gaussians (`GaussianData.flow_map`), otherwise a converged reference solve (two reference solves, at
N and 2N steps, agree; the table shows by how much). Error = RMS(x - x_ref) / RMS(x_ref - mean(x_ref)).
Also: Gaussian covariance log-eigenvalue errors by decile (per basis direction, against the data),
nearest-training-image agreement with the reference (images), mixture weight error and worst
per-dimension std error (mixtures). diffusers' schedulers (experiments/peers/, optional extra) run on the
DDPM-chain problems from the same noise when installed.

    python experiments/benchmarks/sampler_suite.py            # default size (~11 CPU-minutes)
    python experiments/benchmarks/sampler_suite.py --full     # the issue's size (every candidate, more data)
    python experiments/benchmarks/sampler_suite.py --no-peers # ours only
    python experiments/benchmarks/sampler_suite.py --report-only  # tables and plot from the JSON
    python experiments/benchmarks/sampler_suite.py --resume --trained-run work/mnist  # + a trained network
    python experiments/benchmarks/sampler_suite.py --resume --nfes 11,12  # + NFEs, on the stored entries

Default size: 10 problems under the DDPM chain and 3 of them (a Gaussian, a mixture, the 8x8 digits)
under VP, cosine, EDM and flow matching (22 entries), with DEFAULT_CANDIDATES (6 solvers on 1-4 grids
each: one compiled step program per solver serves every grid) and 11 diffusers settings. --full: more
and larger problems, more samples, MNIST in the process sweep, and every solver in CANDIDATE_SOLVERS on
every grid in CANDIDATE_GRIDS. `--trained-run` adds a trained EDM run's network as a problem of its own
class (experiments/benchmarks/trained_problems.py), under the DDPM chain (diffusers beside it) and EDM, at
the selection's NFEs, against a converged reference solve.

Writes experiments/results/sampler_suite.json, and from it (experiments/benchmarks/sampler_selection.py:
the default's selection, tables) sampler_suite.md and sampler_suite.png (error vs NFE, log-log).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from diffjax import processes as P
from diffjax.data.exact import GaussianData
from diffjax.denoisers import Denoiser
from diffjax.io import atomic_write_json
from diffjax.samplers import GRIDS, SOLVERS
from diffjax.validation import build_named
from experiments.benchmarks.common import RESULTS_DIR, environment, package_versions, relative_error, write_results
from experiments.benchmarks.exact_problems import Problem, build_problems
from experiments.benchmarks.trained_problems import TRAINED_PROCESSES, trained_problem

NFES = (3, 5, 8, 10, 11, 12, 13, 14, 15, 20, 50)  # 11-14: where the default switches solver
SELECTION_NFES = (5, 10, 20)
DDPM_BETAS = np.linspace(1e-4, 0.02, 1000)


def make_process(name: str):
    if name == "ddpm":
        return P.VP.from_betas(DDPM_BETAS)
    return {"vp": P.VP, "cosine": P.CosineVP, "edm": P.EDM, "flow": P.FlowMatching}[name]()


PROCESS_SWEEP = ("vp", "cosine", "edm", "flow")  # besides "ddpm", on the problems below
SWEEP_PROBLEMS = ("gauss256_p2", "mix16_sep6_iso", "digits1797")
SWEEP_PROBLEMS_FULL = SWEEP_PROBLEMS + ("mnist2000",)


# ------------------------------------------------------------------------------------------------
# Methods: (solver, options) x grid
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A solver name with options and a grid name with options, as in a config."""

    solver_name: str
    solver_options: tuple = ()
    grid_name: str = "logsnr"
    grid_options: tuple = ()

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.solver_options)
        gopts = ",".join(f"{k}={v}" for k, v in self.grid_options)
        return f"{self.solver_name}({opts}) @ {self.grid_name}" + (f"({gopts})" if gopts else "")

    def solver(self):
        return build_named(SOLVERS, self.solver_name, dict(self.solver_options), "solver")

    def grid(self):
        return build_named(GRIDS, self.grid_name, dict(self.grid_options), "grid")


# (solver name, options): the full size's candidates, each on every grid in CANDIDATE_GRIDS.
CANDIDATE_SOLVERS = [
    ("gaussian_pc", ()),
    ("gaussian_pc", (("order", 1),)),
    ("unipc", ()),
    ("unipc", (("order", 2),)),
    ("unipc", (("order", 2), ("variant", "bh1"))),
    ("unipc", (("order", 3), ("variant", "bh1"))),
    ("unipc", (("lower_order_final", "none"),)),
    ("dpm_solver++", (("order", 2),)),
    ("dpm_solver++", (("order", 3),)),
    ("deis", (("order", 3),)),
    ("ddim", ()),
    ("heun", ()),
]
CANDIDATE_GRIDS = [("logsnr", ()), ("karras", ()), ("flow_time", ()), ("linspace", ())]
# The default size's candidates: (solver, options, grids). One compiled step program per solver serves
# every grid, so grids are cheap and solvers are not.
DEFAULT_CANDIDATES = [
    ("gaussian_pc", (), ("flow_time", "logsnr")),
    ("unipc", (), ("logsnr", "karras", "flow_time", "linspace")),
    ("unipc", (("order", 2),), ("logsnr", "karras", "flow_time", "linspace")),
    ("dpm_solver++", (("order", 2),), ("logsnr", "karras", "flow_time", "linspace")),
    ("dpm_solver++", (("order", 3),), ("logsnr", "karras")),
    ("heun", (), ("karras",)),
]
PREVIOUS_DEFAULT = Method("unipc", (), "logsnr")  # the default at every NFE before the switch
REFERENCE = Method("dpm_solver++", (("order", 3),), "logsnr")


def candidate_methods(full: bool = False) -> list[Method]:
    if full:
        return [Method(s, so, g, go) for s, so in CANDIDATE_SOLVERS for g, go in CANDIDATE_GRIDS]
    return [Method(s, so, g) for s, so, grids in DEFAULT_CANDIDATES for g in grids]


# ------------------------------------------------------------------------------------------------
# Running one method on one problem from given noise
# ------------------------------------------------------------------------------------------------


def _denoiser(process, data) -> Denoiser:
    return Denoiser(lambda x, t: data.posterior_mean(x, process.alpha(t), process.sigma(t)), process, "x0")


@functools.partial(jax.jit, static_argnames=("solver",))
def _init(process, data, solver, x, t_max):
    return solver.init(_denoiser(process, data), x, t_max[None])


@functools.partial(jax.jit, static_argnames=("solver",))
def _step(process, data, solver, x, state, t, t_next, key):
    return solver.step(_denoiser(process, data), x, state, t, t_next, key)


@jax.jit
def _denoise(process, data, x, t):
    return _denoiser(process, data).x0(x, t)


def integrate(process, data, solver, ts, z):
    """x_T = sigma(t_max) z, the (prepared) solver over ts, then D(x, t_min): the steps `Solver.run`
    takes, phase by phase, each step one compiled call. So one step program serves every NFE and grid
    (ts is traced); `sample()` compiles the whole loop instead, with the same result
    (tests/test_sampler_suite.py)."""
    ts = np.asarray(ts, np.float32)
    x = _prior(process, ts[0], z)
    key = jax.random.key(0)  # the candidates are deterministic
    state = _init(process, data, solver, x, ts[0])
    i = 0
    for phase in solver.phases(len(ts) - 1):
        for _ in range(phase.length):
            x, state = _step(process, data, phase.solver, x, state, ts[i], ts[i + 1], key)
            i += 1
    return _denoise(process, data, x, ts[-1])


@jax.jit
def _prior(process, t_max, z):
    return process.sigma(t_max) * z


def _grid_times(process, grid, steps, t_min, t_max):
    """The grid, computed eagerly (a few operations; compiling it per process, grid and steps costs more)."""
    return grid(process, steps, t_min, t_max)


def run_method(process, data, method: Method, nfe: int, z):
    """(samples, the NFE used) for `method` with at most `nfe` network calls (final denoising included)."""
    solver = method.solver()
    steps = solver.steps_for_nfe(nfe)
    t_min, t_max = process.resolve_times()
    solver.check(process, steps, t_min, t_max)
    solver = solver.prepare(process, steps, t_min, t_max)
    ts = _grid_times(process, method.grid(), steps, t_min, t_max)
    return integrate(process, data, solver, ts, z), solver.nfe(steps) + 1


@jax.jit
def _gaussian_reference(process, data: GaussianData, z):
    t_min, t_max = process.t_min, process.t_max
    x_t = process.sigma(t_max) * z
    x = data.flow_map(x_t, process.alpha(t_max), process.sigma(t_max), process.alpha(t_min), process.sigma(t_min))
    return data.posterior_mean(x, process.alpha(t_min), process.sigma(t_min))


def reference(process, problem: Problem, z, steps: int):
    """(x_ref, how far it is from converged): closed form for Gaussians (0), else REFERENCE at 2*steps
    (and the relative difference from the same at `steps`)."""
    if isinstance(problem.data, GaussianData):
        return _gaussian_reference(process, problem.data, z), 0.0
    fine, _ = run_method(process, problem.data, REFERENCE, 2 * steps + 1, z)
    coarse, _ = run_method(process, problem.data, REFERENCE, steps + 1, z)
    return fine, relative_error(coarse, fine)


def one_sample_error(problem: Problem) -> float:
    """The resolution of `relative_error` on an image set: the error that ONE of the batch's samples at
    another training image than the reference's causes, i.e. the median distance from a training image to
    its nearest other one, over sqrt(batch * dim) and the images' RMS spread. Image samples end exactly on
    training images, so errors below this are "no sample differs" (down to round-off) and count as ties."""
    points = np.asarray(problem.data.points, np.float64)
    sq = np.sum(points**2, axis=1)
    d2 = sq[:, None] + sq[None] - 2.0 * points @ points.T
    np.fill_diagonal(d2, np.inf)
    nearest_other = np.sqrt(np.maximum(np.min(d2, axis=1), 0.0))
    spread = np.sqrt(np.mean((points - points.mean(0)) ** 2))
    return float(np.median(nearest_other) / np.sqrt(problem.batch * problem.dim) / spread)


def add_resolutions(references, problems) -> None:
    """Fill each image entry's `one_sample_error` (a payload from before it was recorded: --report-only)."""
    by_name = {p.name: p for p in problems}
    for r in references:
        if r["kind"] == "images" and "one_sample_error" not in r:
            r["one_sample_error"] = one_sample_error(by_name[r["problem"]])


# ------------------------------------------------------------------------------------------------
# Per-class metrics
# ------------------------------------------------------------------------------------------------


def decile_log_variance_errors(data: GaussianData, x) -> list[float]:
    """Per basis direction log(var_hat / var) (mean-centred by the known mean), averaged per decile of the
    spectrum (largest eigenvalues first)."""
    z = (np.asarray(x, np.float64) - np.asarray(data.mean)) @ np.asarray(data.basis, np.float64)
    log_ratio = np.log(np.mean(z**2, axis=0) / np.asarray(data.variances, np.float64))
    return [float(np.mean(part)) for part in np.array_split(log_ratio, 10)]


def mixture_errors(mixture, x) -> dict:
    """Weight error sum |w_hat - w| and the worst per-(component, dimension) relative std error."""
    flat = np.asarray(x, np.float64)
    k = np.asarray(mixture.assign(jnp.asarray(x)))
    weights = np.bincount(k, minlength=mixture.num_components) / len(k)
    worst = 0.0
    for j in range(mixture.num_components):
        members = flat[k == j]
        if len(members) < 10:
            worst = max(worst, 1.0)
            continue
        std = np.sqrt(np.mean((members - np.asarray(mixture.means[j])) ** 2, axis=0))
        worst = max(worst, float(np.max(np.abs(std / np.asarray(mixture.stds[j]) - 1.0))))
    return {"weight_error": float(np.sum(np.abs(weights - np.asarray(mixture.weights)))), "std_error": worst}


def class_metrics(problem: Problem, x, ref_nearest=None) -> dict:
    if problem.kind == "gaussian":
        return {"decile_log_var": decile_log_variance_errors(problem.data, x)}
    if problem.kind == "images":
        nearest = np.asarray(problem.data.nearest(jnp.asarray(x)))
        return {"nn_agreement": float(np.mean(nearest == ref_nearest))} if ref_nearest is not None else {}
    if problem.kind == "trained":
        return {}
    return mixture_errors(problem.data, x)


# ------------------------------------------------------------------------------------------------
# diffusers beside ours (optional)
# ------------------------------------------------------------------------------------------------


def peers_module():
    """experiments.peers.diffusers_schedulers when it and diffusers are importable, else None."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    try:
        import torch  # noqa: PLC0415 (optional extra)

        from experiments.peers import diffusers_schedulers  # noqa: PLC0415
    except ImportError:
        return None
    torch.set_num_threads(1)  # small tensors: many threads on a busy machine make each op ~100x slower
    return diffusers_schedulers


# ------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------


def noise_seed(name: str) -> int:
    """A seed from the problem's name, the same in every process (Python's str hash is salted per process)."""
    return zlib.crc32(name.encode())


def entries(problems, full: bool):
    """(problem, process name) pairs: every problem under the DDPM chain, the sweep problems under all,
    trained networks under TRAINED_PROCESSES."""
    out = [(p, "ddpm") for p in problems]
    sweep = SWEEP_PROBLEMS_FULL if full else SWEEP_PROBLEMS
    out += [(p, name) for p in problems if p.name in sweep for name in PROCESS_SWEEP]
    out += [(p, name) for p in problems if p.kind == "trained" for name in TRAINED_PROCESSES if name != "ddpm"]
    return out


def entry_nfes(problem: Problem, nfes):
    """A trained network runs at the selection's NFEs only (each of its evaluations costs a network call)."""
    return [n for n in nfes if n in SELECTION_NFES] if problem.kind == "trained" else list(nfes)


def check_same_origin(stored: dict, problem: Problem) -> None:
    """A resumed entry must be of the same problem: ValueError when its stored origin or batch differ."""
    if stored.get("origin", "") != problem.origin or int(stored["batch"]) != problem.batch:
        raise ValueError(
            f"--resume: entry {stored['entry']!r} was run on {stored.get('origin') or 'its built-in data'} with "
            f"{stored['batch']} samples, now {problem.origin or 'its built-in data'} with {problem.batch}; "
            "resume with the same run and batch, or remove the entry from the results first"
        )


def check_same_reference(stored: dict, gap: float) -> None:
    """A resumed entry's recomputed reference must be the stored one: its N vs 2N-step gap is a fingerprint
    of the problem, noise and reference solver (ValueError if they moved, e.g. after a library change)."""
    if not np.isclose(gap, float(stored["reference_gap"]), rtol=1e-3, atol=1e-9):
        raise ValueError(
            f"--resume: entry {stored['entry']!r}'s reference gap is now {gap:.6g}, stored "
            f"{stored['reference_gap']:.6g}: its reference changed since it was stored; rerun without --resume"
        )


def check_same_settings(done: dict, full: bool, methods, reference_steps: int, peers: bool) -> None:
    """A resumed payload must have been run with the same size, methods, reference and peers, or the rows
    of its entries would mix settings: ValueError naming what differs."""
    stored = {"full": done["full"], "methods": done["methods"], "reference steps": done["reference_steps"][0],
              "diffusers": bool(done.get("peer_versions"))}  # fmt: skip
    now = {"full": full, "methods": [m.label for m in methods], "reference steps": reference_steps, "diffusers": peers}
    differ = [key for key in stored if stored[key] != now[key]]
    if differ:
        raise ValueError(
            f"--resume: the stored run differs in {', '.join(differ)} (stored "
            f"{ {k: stored[k] for k in differ} }, now { {k: now[k] for k in differ} }); resume with the same "
            "settings, or run the suite afresh under another --name"
        )


def run_suite(
    full: bool = False,
    peers: bool = True,
    methods=None,
    nfes=NFES,
    reference_steps=None,
    log=print,
    save=None,
    done=None,
    trained=(),
):
    """Run every method on every (problem, process); returns the JSON-able result dict. `save(payload)` is
    called after every entry with the results so far; entries in `done` (a payload) are kept, not rerun.
    `trained`: problems of trained networks (trained_problems.trained_problem) run after the exact ones. With
    `done`, NFEs not in it are added to its entries (their reference is recomputed and checked)."""
    problems = build_problems(full) + list(trained)
    methods = candidate_methods(full) if methods is None else methods
    reference_steps = reference_steps or (400 if full else 200)
    peer = peers_module() if peers else None
    if done:
        check_same_settings(done, full, methods, reference_steps, peer is not None)
    rows, references = (list(done["rows"]), list(done["references"])) if done else ([], [])
    finished = {r["entry"]: r for r in references}
    runs = list(done.get("runs", [])) if done else []  # the invocations that added to it (recorded since 2026-12-07)
    runs.append({"started": environment()["date"], "jax": jax.__version__, "nfes": list(nfes),
                 "trained": [p.origin for p in trained]})  # fmt: skip
    nfes = sorted(set(nfes) | set(done["nfes"] if done else ()))
    start = time.perf_counter() - (done["seconds"] if done else 0.0)
    cpu_start = time.process_time() - (done.get("cpu_seconds", 0.0) if done else 0.0)

    def payload():
        return {
            "full": full,
            "nfes": list(nfes),
            "methods": [m.label for m in methods],
            "previous_default": PREVIOUS_DEFAULT.label,
            "reference_method": REFERENCE.label,
            "reference_steps": [reference_steps, 2 * reference_steps],
            "references": references,
            "rows": rows,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,  # every thread of this process
            "peer_versions": package_versions("diffusers", "torch") if peer is not None else {},
            "runs": runs,
        }

    for problem, process_name in entries(problems, full):
        process = make_process(process_name)
        entry = f"{problem.name}/{process_name}"
        todo = entry_nfes(problem, nfes)
        if entry in finished:  # resumed: only the NFEs it was not run at
            check_same_origin(finished[entry], problem)
            stored = {r["nfe"] for r in rows if r["entry"] == entry}
            todo = [n for n in todo if n not in stored]
            if not todo:
                continue
        z = jax.random.normal(jax.random.key(noise_seed(problem.name)), (problem.batch, problem.dim))
        t0 = time.perf_counter()
        ref, converged = reference(process, problem, z, reference_steps)
        ref_nearest = np.asarray(problem.data.nearest(ref)) if problem.kind == "images" else None
        if entry in finished:
            check_same_reference(finished[entry], converged)
        else:
            references.append(
                {"entry": entry, "problem": problem.name, "kind": problem.kind, "process": process_name,
                 "dim": problem.dim, "batch": problem.batch, "reference_gap": converged,
                 **class_metrics(problem, ref)}
            )  # fmt: skip
            if problem.kind == "images":
                references[-1]["one_sample_error"] = one_sample_error(problem)
            if problem.origin:
                references[-1]["origin"] = problem.origin
        for method in tqdm(methods, desc=entry, leave=False, mininterval=5):
            for nfe in todo:
                try:
                    x, used = run_method(process, problem.data, method, nfe, z)
                except ValueError:  # fewer evaluations than one step needs
                    continue
                rows.append(
                    {"entry": entry, "problem": problem.name, "kind": problem.kind, "process": process_name,
                     "library": "diffjax", "method": method.label, "nfe": nfe, "nfe_used": used,
                     "error": relative_error(x, ref), **class_metrics(problem, x, ref_nearest)}
                )  # fmt: skip
        if peer is not None and process_name == "ddpm":
            rows += run_peers(peer, problem, process, z, ref, ref_nearest, todo)
        log(f"{entry}: reference gap {converged:.2e}, {time.perf_counter() - t0:.1f} s")
        if save is not None:
            save(payload())
    return payload()


# diffusers' settings run beside ours (the rest of experiments/peers' SETTING_NAMES are variants of these)
PEER_SETTINGS = (
    "dpm++2m",
    "dpm++2m_karras",
    "dpm++2m_lu",
    "dpm++3m_karras",
    "unipc_bh2",
    "unipc_bh2_karras",
    "unipc3_bh2",
    "deis",
    "ddim_trailing",
    "euler_karras",
    "heun_karras",
)


def run_peers(peer, problem, process, z, ref, ref_nearest, nfes) -> list[dict]:
    """diffusers' settings on the DDPM chain from the same noise (their start must be ours: t_max)."""
    x0_fn = problem.x0_fn()
    x_start = np.asarray(_prior(process, np.float32(process.t_max), z), np.float64)
    rows = []
    for name in tqdm(PEER_SETTINGS, desc="diffusers", leave=False, mininterval=5):
        for nfe in nfes:
            noise = x_start / peer.initial_std(name, nfe, DDPM_BETAS)
            try:
                result = peer.run_setting(name, x0_fn, noise, nfe, betas=DDPM_BETAS)
            except ValueError:
                continue
            x = np.asarray(result.samples, np.float32).reshape(z.shape)
            rows.append(
                {"entry": f"{problem.name}/ddpm", "problem": problem.name, "kind": problem.kind, "process": "ddpm",
                 "library": "diffusers", "method": f"diffusers {name}", "nfe": nfe, "nfe_used": int(result.nfe),
                 "error": relative_error(x, ref), **class_metrics(problem, x, ref_nearest)}
            )  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue's full size")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers even when installed")
    parser.add_argument("--name", default="sampler_suite", help="results/<name>.json, .md, .png")
    parser.add_argument("--report-only", action="store_true", help="rebuild tables and plot from the JSON")
    parser.add_argument("--resume", action="store_true", help="keep the entries already in the JSON")
    parser.add_argument(
        "--trained-run", action="append", default=[], metavar="WORKDIR",
        help="also a trained EDM run's network (repeatable; experiments/benchmarks/trained_problems.py)",
    )  # fmt: skip
    parser.add_argument("--trained-batch", type=int, default=64, help="samples per trained-network run")
    parser.add_argument(
        "--nfes", default=",".join(map(str, NFES)),
        help="comma-separated NFEs; with --resume, those not yet run are added to every stored entry",
    )  # fmt: skip
    args = parser.parse_args(argv)
    nfes = parse_nfes(args.nfes, parser.error)
    if args.trained_batch < 1:
        parser.error(f"--trained-batch={args.trained_batch}: use 1 or more samples")
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/diffjax_suite_jax"))
    path = os.path.join(RESULTS_DIR, f"{args.name}.json")
    done = None
    if args.report_only or args.resume:
        with open(path) as f:
            done = json.load(f)
    if args.report_only:
        payload = done
        if any(r["kind"] == "images" and "one_sample_error" not in r for r in payload["references"]):
            add_resolutions(payload["references"], build_problems(payload["full"]))
            atomic_write_json(path, payload)
        if "peer_versions" not in payload and any(r["library"] == "diffusers" for r in payload["rows"]):
            payload["peer_versions"] = package_versions("diffusers", "torch")  # (a run from before they were kept)
            atomic_write_json(path, payload)
    else:
        save = functools.partial(write_results, args.name)
        trained = [trained_problem(workdir, args.trained_batch) for workdir in args.trained_run]
        names = [p.name for p in trained]
        if len(set(names)) < len(names):
            parser.error(f"--trained-run: the runs {args.trained_run} give the problem names {names}; give "
                         "runs of different data sets or models (their entries would mix)")  # fmt: skip
        payload = run_suite(full=args.full, peers=not args.no_peers, nfes=nfes, save=save, done=done, trained=trained)
        write_results(args.name, payload)
        with open(path) as f:
            payload = json.load(f)  # with the environment
    report(payload, args.name)


def parse_nfes(text: str, error) -> list[int]:
    """'5,10,20' -> [5, 10, 20]; `error(message)` (argparse's) on anything but integers of at least 2."""
    try:
        nfes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        nfes = []
    if not nfes or nfes[0] < 2:
        error(f"--nfes={text!r}: give comma-separated integers of at least 2 (one step and the final denoising)")
    return nfes


def report(payload, name):
    """Tables (markdown), plot and selection from a suite's payload."""
    from experiments.benchmarks import sampler_selection  # noqa: PLC0415

    sampler_selection.write_report(payload, name)


if __name__ == "__main__":
    main()
