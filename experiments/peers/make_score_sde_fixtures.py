"""Fixtures for `load_pretrained(path, format="score-sde")`: score_sde's own NCSN++ / DDPM++ code (Song et
al. 2021, github.com/yang-song/score_sde, JAX / Flax linen) on tiny random networks, its checkpoints and
its score function's outputs.

    python -m experiments.peers.make_score_sde_fixtures [--score-sde PATH]

PATH is score_sde's source: a checkout, or a bare git directory (default: the local mirror
/work/.mirror/yang-song+score_sde/repo, read at HEAD). Its `models/`, `configs/` and `sde_lib.py` are
copied into a temporary directory at run time (nothing of it is committed here) and run in a child
process with that directory first on PYTHONPATH. The patches made there, for current jax / flax and
without tensorflow:

- `utils.py` (top level, imports tensorflow) is replaced by a stub holding only `batch_mul`, the one
  name `sde_lib` and `models/utils.py` take from it (`jax.vmap(lambda a, b: a * b)`, as in score_sde);
- `models/utils.py`: the annotation `flax.optim.Optimizer` of its `State` (flax.optim is gone from
  flax) becomes `Any`, and in `init_model` `variables.pop('params')` (a FrozenDict method; linen's
  `init` now returns a plain dict) becomes `flax.core.pop(variables, 'params')`;
- empty `__init__.py` files in `configs/` and its folders, so that `configs.ve...` is score_sde's
  package and not diffjax's own `configs` (regular packages win over namespace packages).

No other line of score_sde is changed: its NCSNpp, layers, FIR resampling, SDEs and `get_score_fn`
run as published. The cases (CASES) are score_sde's config files: VE NCSN++ and VP DDPM++ each with
their own checkpoint; sub-VP DDPM++ and the discrete VP DDPM++ (DDPM chain) reuse the VP DDPM++
checkpoint (same architecture, other conventions). For each, the child takes score_sde's config file,
shrinks the network (image 8x8x3, nf 4, ch_mult (1, 2), one residual block per level, attention at
4x4), initialises it with `models.utils.init_model`, replaces every parameter by a random draw (its
zero-initialised layers would otherwise hide errors; the Fourier frequencies stay), makes an EMA copy
that differs from it, and writes

- `tests/fixtures/score_sde/<case>_checkpoint_1`: the training state as `flax.training.checkpoints.
  save_checkpoint(dir, state, step)` writes it (`flax.serialization.to_bytes` of score_sde's `State`:
  step, optimizer {target, state {step, param_states}}, lr, model_state, ema_rate, params_ema, rng),
  except that Adam's moments are stored as one scalar zero per parameter to keep the fixture small (the
  reader never reads them);
- `tests/fixtures/score_sde/reference.npz`: per case the inputs x, t and score_sde's outputs from
  `models.utils.get_score_fn(sde, model, params_ema, model_state, continuous=...)` (score) and the same
  with `optimizer.target` (score_target, for the cases with their own checkpoint), the SDE built as
  run_lib builds it, and the network's own output at get_score_fn's labels (model: the score for VE,
  where it divides by sigma itself; the eps prediction for VP and sub-VP);
- `tests/fixtures/score_sde/configs.json`: the score_sde config of each case (the fields the reader uses).

The parent then loads each checkpoint with our reader, compares, and writes
experiments/results/score_sde_equality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from diffjax.io import atomic_write_bytes
from diffjax.models.pretrained import load_pretrained
from diffjax.models.score_sde_checkpoint import CONFIG_FIELDS, score_sde_network_fn, score_sde_score_fn
from experiments.benchmarks.common import markdown_table, write_results

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "score_sde"
MIRROR = "/work/.mirror/yang-song+score_sde/repo"
BATCH = 4
TINY = dict(image_size=8, nf=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))

# case -> (score_sde config file, the case whose checkpoint it reuses or None)
CASES = {
    "ve_ncsnpp_continuous": ("configs/ve/cifar10_ncsnpp_continuous.py", None),
    "vp_ddpmpp_continuous": ("configs/vp/cifar10_ddpmpp_continuous.py", None),
    "subvp_ddpmpp_continuous": ("configs/subvp/cifar10_ddpmpp_continuous.py", "vp_ddpmpp_continuous"),
    # the discrete DDPM chain: the same weights as vp_ddpmpp_continuous, score_sde's discrete convention
    "vp_ddpmpp_discrete": ("configs/vp/cifar10_ddpmpp.py", "vp_ddpmpp_continuous"),
}
# What the fixtures record of each config: the reader's fields and four it ignores.
RECORDED_FIELDS = {
    **CONFIG_FIELDS,
    "model": CONFIG_FIELDS["model"] + ("progressive_combine", "fourier_scale", "init_scale", "dropout"),
}

# (old, new) in score_sde's models/utils.py
_MODEL_UTILS_PATCHES = (
    ("optimizer: flax.optim.Optimizer", "optimizer: Any"),
    ("variables.pop('params')", "flax.core.pop(variables, 'params')"),
)
_UTILS_STUB = '''"""Stub for score_sde's utils.py (which imports tensorflow): only batch_mul."""
import jax


def batch_mul(a, b):
  return jax.vmap(lambda a, b: a * b)(a, b)
'''


# ----------------------------------------------------------------------------------------------
# Parent: copy and patch score_sde, run the child, check our reader against the fixtures
# ----------------------------------------------------------------------------------------------


def _source_files(source: str) -> dict[str, bytes]:
    """score_sde's models/, configs/ and sde_lib.py from a checkout or a bare git directory."""
    wanted = lambda p: p.startswith(("models/", "configs/")) or p == "sde_lib.py"  # noqa: E731
    src = Path(source)
    if (src / "models" / "ncsnpp.py").is_file():
        return {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*.py") if wanted(str(p.relative_to(src)))}
    git = ["git", f"--git-dir={src}"]
    names = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD"], check=True, capture_output=True, text=True)
    paths = [p for p in names.stdout.split() if p.endswith(".py") and wanted(p)]
    return {p: subprocess.run([*git, "show", f"HEAD:{p}"], check=True, capture_output=True).stdout for p in paths}


def _patched_copy(source: str, tmp: Path) -> None:
    for rel, data in _source_files(source).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    (tmp / "utils.py").write_text(_UTILS_STUB)
    for folder in (tmp / "configs").rglob("*"):  # regular packages, so that ours (also `configs`) is not found
        if folder.is_dir() and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
    (tmp / "configs" / "__init__.py").touch()
    mutils = tmp / "models" / "utils.py"
    text = mutils.read_text()
    for old, new in _MODEL_UTILS_PATCHES:
        if old not in text:
            raise RuntimeError(f"score_sde's models/utils.py changed: {old!r} not found")
        text = text.replace(old, new)
    mutils.write_text(text)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_ours() -> dict:
    """Our reader on each fixture: max |ours - score_sde| / max |score_sde| of the score (EMA weights)."""
    configs = json.loads((FIXTURES / "configs.json").read_text())
    rows = {}
    with np.load(FIXTURES / "reference.npz") as z:
        for case, cfg in configs.items():
            ckpt = FIXTURES / f"{cfg['checkpoint']}_checkpoint_1"
            pt = load_pretrained(ckpt, format="score-sde", config=cfg["config"])
            x, t = z[f"{case}/x"], z[f"{case}/t"]
            score = score_sde_score_fn(pt, cfg["config"])(x, t)
            model = score_sde_network_fn(pt, cfg["config"])(x, t)
            rows[case] = {
                "score_sde_config": cfg["score_sde_config"],
                "max_rel_error_network": _rel_err(model, z[f"{case}/model"]),
                "max_rel_error_score": _rel_err(score, z[f"{case}/score"]),
                "max_rel_error_score_t_above_0.3": _rel_err(score[t > 0.3], z[f"{case}/score"][t > 0.3]),
                "process": type(pt.process).__name__,
                "prediction": str(pt.prediction),
            }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score-sde", default=MIRROR, help="score_sde checkout or bare git directory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run score_sde's code
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _patched_copy(args.score_sde, Path(tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, str(ROOT)]), JAX_PLATFORMS="cpu")
        out = Path(tmp) / "out"
        out.mkdir()
        cmd = [sys.executable, "-m", "experiments.peers.make_score_sde_fixtures", "--child", str(out)]
        subprocess.run(cmd, check=True, cwd=tmp, env=env)
        for f in out.iterdir():  # the child wrote them all: each fixture replaced whole
            atomic_write_bytes(FIXTURES / f.name, f.read_bytes())
    sizes = {f.name: f.stat().st_size for f in sorted(FIXTURES.iterdir())}
    print("fixtures:", sizes, "total", sum(sizes.values()), "bytes")
    rows = check_ours()
    write_score_sde_results(rows)


def write_score_sde_results(rows: dict) -> None:
    table = markdown_table(
        ["case", "score_sde config", "our process", "network output", "score", "score, t > 0.3"],
        [
            [
                c,
                r["score_sde_config"],
                r["process"],
                f"{r['max_rel_error_network']:.2e}",
                f"{r['max_rel_error_score']:.2e}",
                f"{r['max_rel_error_score_t_above_0.3']:.2e}",
            ]
            for c, r in rows.items()
        ],
    )
    md = (
        '# score_sde checkpoints read by `load_pretrained(format="score-sde")`\n\n'
        "Tiny random networks (image 8x8x3, nf 4, ch_mult (1, 2), 1 block, attention at 4x4) built and run by\n"
        "score_sde's own code; its score function (`get_score_fn` with its SDE, EMA weights) against ours on\n"
        "the same inputs, float32 on CPU. Error: max |ours - score_sde| / max |score_sde| over the batch\n"
        "(4 times from t = eps to 1). Network output: score_sde's NCSNpp at get_score_fn's labels (the score\n"
        "for VE, eps for VP / sub-VP) against ours. Near t = 0 the VP / sub-VP scores differ by score_sde's\n"
        "float32 sigma(t) = sqrt(1 - exp(2 log alpha)) (cancellation: sigma(1e-3) off by about 1e-4 relative),\n"
        "which ours computes without cancellation; above t = 0.3 the scores agree to float32 rounding.\n"
        "The discrete chain's network input, our step N t - 1 at t = (j + 1) / N, rounds in float32 (step 400\n"
        "comes out 3e-5 off), hence its larger network error.\n"
        "Made by `python -m experiments.peers.make_score_sde_fixtures`; checked by\n"
        "tests/test_pretrained_score_sde.py.\n\n" + table
    )
    print(md)
    write_results("score_sde_equality", {"cases": rows}, md)


# ----------------------------------------------------------------------------------------------
# Child: runs inside the patched copy of score_sde (its directory first on PYTHONPATH)
# ----------------------------------------------------------------------------------------------


def _score_sde_config(path: str):
    import importlib  # noqa: PLC0415 (score_sde's modules exist only in the child)

    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    config = module.get_config()
    config.data.image_size = TINY["image_size"]
    for key in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions"):
        config.model[key] = TINY[key]
    config.model.dropout = 0.0
    return config


def _plain(config) -> dict:
    out = {}
    for group, fields in RECORDED_FIELDS.items():
        section = getattr(config, group)
        out[group] = {f: (list(section[f]) if isinstance(section[f], tuple) else section[f]) for f in fields}
    return out


def _sde(config):
    import sde_lib  # noqa: PLC0415

    m = config.model
    if config.training.sde == "vesde":
        return sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales), 1e-5
    if config.training.sde == "vpsde":
        return sde_lib.VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales), 1e-3
    return sde_lib.subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales), 1e-3


def _randomised(params, rng):
    """Every parameter redrawn: N(0, 1 / fan_in) kernels, N(0, 0.3^2) biases and norm offsets, 1 + N(0,
    0.2^2) norm scales; the Fourier frequencies W kept."""
    import flax  # noqa: PLC0415

    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for path, p in flat.items():
        p = np.asarray(p)
        if path[-2].startswith("GaussianFourierProjection"):
            out[path] = p
        elif path[-1] in ("kernel", "weight", "W"):
            out[path] = (rng.standard_normal(p.shape) / np.sqrt(np.prod(p.shape[:-1]))).astype(np.float32)
        elif path[-1] == "scale":
            out[path] = (1 + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)
        else:
            out[path] = (0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    return flax.traverse_util.unflatten_dict(out)


def _state_bytes(step, target, ema, model_state, rate, key) -> bytes:
    """score_sde's State (models/utils.py) with flax.optim's Adam, as `flax.serialization.to_state_dict`
    lays it out, serialised by `to_bytes` (what checkpoints.save_checkpoint writes)."""
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415

    zeros = jax.tree_util.tree_map(lambda p: {"grad_ema": np.float32(0), "grad_sq_ema": np.float32(0)}, target)
    state = {
        "step": np.int64(step),
        "optimizer": {"state": {"step": np.int64(step), "param_states": zeros}, "target": target},
        "lr": np.float32(2e-4),
        "model_state": flax.core.unfreeze(model_state),
        "ema_rate": np.float32(rate),
        "params_ema": ema,
        "rng": np.asarray(key),
    }
    return flax.serialization.msgpack_serialize(state)


def _inputs(case, config, sde, eps, rng):
    c, s = config.data.num_channels, config.data.image_size
    t = np.linspace(eps, 1.0, BATCH, dtype=np.float32) if "discrete" not in case else None
    if t is None:  # discrete VP: score_sde evaluates labels t (N - 1); integer steps j = t (N - 1)
        n = np.float32(config.model.num_scales - 1)
        t = (np.array([0, 3, 400, 999]) / n).astype(np.float32)
        t = np.where(t * n < np.round(t * n), np.nextafter(t, np.float32(2)), t)  # t (N - 1) exact in float32
        assert np.all(t * n == np.round(t * n))
    x0 = rng.uniform(0.0, 1.0, (BATCH, s, s, c)).astype(np.float32)
    if config.data.centered:
        x0 = 2 * x0 - 1
    mean, std = sde.marginal_prob(x0, t)
    return t, np.asarray(mean + std[:, None, None, None] * rng.standard_normal(x0.shape), np.float32)


def _labels(config, sde, t):
    """The network's time input as models/utils.py get_score_fn computes it from t."""
    import jax.numpy as jnp  # noqa: PLC0415

    t = jnp.asarray(t)
    if config.training.sde == "vesde":  # continuous VE: sigma(t)
        return sde.marginal_prob(jnp.zeros((t.shape[0], 1)), t)[1]
    if config.training.continuous or config.training.sde == "subvpsde":
        return t * 999
    return t * (sde.N - 1)


def child(out: Path) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import models.ncsnpp  # noqa: F401, PLC0415 (registers the 'ncsnpp' model)
    from models import utils as mutils  # noqa: PLC0415

    rng = np.random.default_rng(0)
    reference, configs, weights = {}, {}, {}
    for i, (case, (config_file, reuse)) in enumerate(CASES.items()):
        config = _score_sde_config(config_file)
        sde, eps = _sde(config)
        model, model_state, params = mutils.init_model(jax.random.PRNGKey(i), config)
        if reuse is None:
            target = _randomised(params, rng)
            ema = jax.tree_util.tree_map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), target)
            weights[case] = (target, ema)
            blob = _state_bytes(1, target, ema, model_state, config.model.ema_rate, jax.random.PRNGKey(7))
            (out / f"{case}_checkpoint_1").write_bytes(blob)
        target, ema = weights[reuse or case]
        t, x = _inputs(case, config, sde, eps, rng)
        continuous = config.training.continuous
        for name, params in (("score", ema), ("score_target", target))[: 1 if reuse else 2]:
            score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False, continuous=continuous)
            reference[f"{case}/{name}"] = np.asarray(score_fn(jnp.asarray(x), jnp.asarray(t)), np.float32)
        model_fn = mutils.get_model_fn(model, ema, model_state, train=False)
        reference[f"{case}/model"] = np.asarray(model_fn(jnp.asarray(x), _labels(config, sde, t))[0], np.float32)
        reference[f"{case}/x"], reference[f"{case}/t"] = x, t
        configs[case] = {"checkpoint": reuse or case, "score_sde_config": config_file, "config": _plain(config)}
        print(case, "score rms", float(np.sqrt(np.mean(reference[f"{case}/score"] ** 2))))
    np.savez(out / "reference.npz", **reference)
    (out / "configs.json").write_text(json.dumps(configs, indent=1) + "\n")


if __name__ == "__main__":
    main()
