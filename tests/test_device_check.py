"""The prepared accelerator check (experiments/device_check.py) cannot rot: its time guard, its
refusal to write a dry run into experiments/results, its table, and its `--dry-run` on CPU.

The default run covers the guard, the table and the dry run of the sampling section (one tiny DiT
compiled once); the whole dry run (every section: Pallas in interpret mode, three train steps, the
PyTorch child process, sampling) takes minutes on a shared 2-core machine and is marked slow."""

import json
import os
import subprocess
import sys

import pytest

from diffjax.samplers import default_solver
from experiments import device_check
from experiments.benchmarks.common import RESULTS_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Rows the CPU cannot run: skipped with these reasons, never silently.
CPU_SKIPS = ("cuDNN needs an NVIDIA GPU", "Mosaic GPU attention needs a Hopper GPU")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_time_guard_keeps_later_sections_share_and_passes_on_unused_time():
    clock = FakeClock()
    guard = device_check.TimeGuard({"a": 10.0, "b": 20.0, "c": 5.0}, ("a", "b", "c"), clock=clock)
    guard.start("a")
    assert guard.left() == pytest.approx(10.0)
    assert guard.skip_reason(9.0) is None
    assert "11 s needed" in guard.skip_reason(11.0) and "section a" in guard.skip_reason(11.0)
    clock.now += 4.0  # a finishes early: b gets its 20 s plus a's unused 6 s, c keeps its 5 s
    guard.start("b")
    assert guard.left() == pytest.approx(26.0)
    clock.now += 30.0  # b overran into c's share
    guard.start("c")
    assert guard.left() == pytest.approx(1.0)
    assert guard.skip_reason(2.0) is not None


def test_scaled_budgets_keep_the_shares():
    budgets = device_check.scaled_budgets({"a": 1.0, "b": 3.0}, 8.0)
    assert budgets == pytest.approx({"a": 2.0, "b": 6.0})


def test_dry_run_refuses_the_results_folder():
    with pytest.raises(SystemExit, match="must not write into"):
        device_check.check_out_dir(RESULTS_DIR, dry_run=True)
    assert device_check.check_out_dir(RESULTS_DIR, dry_run=False) == RESULTS_DIR


def test_table_shows_skips_errors_and_the_torch_ratio(tmp_path):
    report = device_check.Report(str(tmp_path), "t", {"dry_run": True})
    report.sections["train_step"].append(
        {"preset": "DiT-B/2", "batch": 4, "remat": "none", "images_per_s": 30.0, "model_changes": {}}
    )
    report.sections["torch_train_step"] += [
        {"preset": "DiT-B/2", "batch": 4, "mode": "eager", "images_per_s": 20.0, "model_changes": {}},
        {"preset": "DiT-B/2", "batch": 4, "mode": "torch.compile", "error": "RuntimeError: no | compiler"},
    ]
    report.sections["sampling"].append({"preset": "DiT-B/2", "batch": 4, "nfe": 10, "skipped": "time guard: x"})
    device_check.diffjax_over_torch(report)
    assert report.sections["torch_train_step"][0]["diffjax_over_torch"] == pytest.approx(1.5)
    text = device_check.render_markdown(report)
    assert "| 1.5 |" in text
    assert "error: RuntimeError: no / compiler" in text  # a | would break the table
    assert "skipped: time guard: x" in text


def _read(out_dir):
    with open(os.path.join(out_dir, "device_check_dry_run.json")) as f:
        return json.load(f)


@pytest.mark.slow  # ~11 s; the other dry-run sections stay in the default run
def test_dry_run_sampling_section(tmp_path):
    path = device_check.main(["--dry-run", "--out-dir", str(tmp_path), "--sections", "sampling"])
    assert path == str(tmp_path / "device_check_dry_run.json")
    result = _read(tmp_path)
    rows = result["sections"]["sampling"]
    assert [r["nfe"] for r in rows] == list(device_check.dry_plan().sample_nfes)
    for row in rows:
        assert row["finite"] and row["images_per_s"] > 0, row
        assert row["steps"] == row["nfe"] - 1 and row["solver"] == type(default_solver(row["steps"])).__name__
    assert result["environment"]["device"].startswith("cpu")
    assert os.path.exists(tmp_path / "device_check_dry_run.md")


@pytest.mark.slow
def test_full_dry_run_exercises_every_section(tmp_path):
    before = sorted(os.listdir(RESULTS_DIR))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a GPU host
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "experiments.device_check", "--dry-run", "--out-dir", str(tmp_path)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=900)
    result = _read(tmp_path)
    for section in device_check.SECTIONS:
        rows = result["sections"][section]
        assert rows, section
        for row in rows:
            assert "error" not in row, row
            assert "skipped" not in row or row["skipped"] in CPU_SKIPS, row
    measured = {r["implementation"] for r in result["sections"]["attention"] if "forward_tflops" in r}
    assert measured == {"diffjax_pallas_gpu", "xla", "jax_pallas_triton"}
    for row in result["sections"]["attention"]:
        if "relative_error" in row:
            assert max(row["relative_error"].values()) < 2e-2, row  # bf16 inputs, f32 reference
    assert {r["mode"] for r in result["sections"]["torch_train_step"]} == {"eager", "torch.compile"}
    assert sorted(os.listdir(RESULTS_DIR)) == before


def test_enable_compilation_cache_sets_jax_options_and_checks_its_input(tmp_path, monkeypatch):
    import jax

    from diffjax.training.run import default_compilation_cache_dir, enable_compilation_cache

    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {key: jax.config.values[key] for key in keys}
    try:
        directory = enable_compilation_cache(str(tmp_path / "cache"), min_compile_time_s=0.25)
        assert directory == str(tmp_path / "cache") and os.path.isdir(directory)
        assert jax.config.values["jax_enable_compilation_cache"] is True
        assert jax.config.values["jax_compilation_cache_dir"] == directory
        assert jax.config.values["jax_persistent_cache_min_compile_time_secs"] == 0.25
        with pytest.raises(ValueError, match="min_compile_time_s=-1"):
            enable_compilation_cache(str(tmp_path), min_compile_time_s=-1)
    finally:
        for key, value in saved.items():
            jax.config.update(key, value)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_compilation_cache_dir() == str(tmp_path / "diffjax" / "jax-compilation-cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert default_compilation_cache_dir() == "/elsewhere"
