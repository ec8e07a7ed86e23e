"""The CPU benchmarks' own logic: variant parsing and baselines (cpu_vs_torch), op classes
(cpu_step_profile), argument checks (cpu_devices_batch, cpu_all_reduce, cpu_collective_hang,
distill_cpu_split), all-reduce operand counts and the one-operand gradient (cpu_all_reduce), and one
waited-for trial of cpu_collective_hang."""

import jax
import jax.numpy as jnp
import pytest

from experiments import cpu_collective_hang
from experiments.benchmarks import cpu_all_reduce, cpu_devices_batch, cpu_vs_torch, distill_cpu_split
from experiments.benchmarks.cpu_step_profile import classify
from experiments.benchmarks.cpu_vs_torch import parse_variants


def test_variants_name_their_contestant_and_collect_variables():
    variants = parse_variants(
        ["tcmalloc:LD_PRELOAD=/lib/libtcmalloc.so", "torch/tcmalloc:LD_PRELOAD=/lib/x.so", "flags:A=1", "flags:B=x=y"]
    )
    assert variants == {
        "diffjax tcmalloc": {"LD_PRELOAD": "/lib/libtcmalloc.so"},
        "torch tcmalloc": {"LD_PRELOAD": "/lib/x.so"},
        "diffjax flags": {"A": "1", "B": "x=y"},
    }
    for bad in ("no-assignment", "label:=1", "pytorch/x:A=1", "two words:A=1"):
        with pytest.raises(SystemExit, match="--variant must look like"):
            parse_variants([bad])


def test_a_tree_variant_runs_its_worker_in_that_checkout(tmp_path, monkeypatch):
    from experiments.benchmarks.common import REPO

    assert parse_variants([f"before:TREE={REPO}"]) == {"diffjax before": {"TREE": str(REPO)}}
    with pytest.raises(SystemExit, match="is not a checkout of this repository"):
        parse_variants([f"before:TREE={tmp_path}"])
    started = []
    monkeypatch.setattr(cpu_vs_torch.subprocess, "Popen", lambda command, **kw: started.append(kw))
    monkeypatch.setenv("TREE", "/somewhere/else")  # a shell's TREE moves no contestant
    cpu_vs_torch.Contestant("unet", "diffjax before", {"TREE": str(tmp_path), "A": "1"})
    cpu_vs_torch.Contestant("unet", "diffjax")
    assert [kw["cwd"] for kw in started] == [str(tmp_path), REPO]
    assert started[0]["env"]["A"] == "1"


def test_a_baseline_must_run_in_every_task():
    # checked before any worker starts (a worker would take seconds to start)
    with pytest.raises(SystemExit, match="'torch.compile' is not a contestant of task 'sample'"):
        cpu_vs_torch.main(["--tasks", "unet,sample", "--baseline", "torch.compile"])
    with pytest.raises(SystemExit, match="'diffjax x' is not a contestant of task 'unet'"):
        cpu_vs_torch.main(["--tasks", "unet", "--baseline", "diffjax x"])


@pytest.mark.parametrize("args", [["--batches", "3,8"], ["--devices", "1"], ["--rounds", "0"], ["--batches", "-2"]])
def test_cpu_devices_batch_refuses_bad_arguments(args):
    with pytest.raises(SystemExit, match="every batch must be a positive multiple of --devices"):
        cpu_devices_batch.main(args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "1"], "--devices 1 must be >= 2"),
        (["--steps", "1"], "--steps >= 2"),
        (["--rounds", "0"], "--rounds and --sample-calls >= 1"),
        (["--batch-size", "63"], "--batch-size 63 and --sample-batch 250 must divide over --devices 2"),
    ],
)
def test_distill_cpu_split_refuses_bad_arguments(args, message):
    with pytest.raises(SystemExit, match=message):
        distill_cpu_split.main(args)


def test_profile_classes_tell_kernel_gradients_from_forward_convolutions():
    def loss(x, kernel):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) @ jnp.ones((8, 4)))

    x, kernel = jnp.ones((2, 16, 16, 4)), jnp.ones((3, 3, 4, 8))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
    classes = {kind for kind, _ in classify(text).values()}
    assert {"convolution: kernel gradient", "convolution: other", "dot"} <= classes


MULTI_OUTPUT_TRANSPOSE = """HloModule m
%fused (p: f32[2,3]) -> (f32[3,2], f32[2,3]) {
  %p = f32[2,3]{1,0} parameter(0)
  %t = f32[3,2]{1,0} transpose(%p), dimensions={1,0}
  ROOT %tuple = (f32[3,2]{1,0}, f32[2,3]{1,0}) tuple(%t, %p)
}

ENTRY %main (a: f32[2,3]) -> (f32[3,2], f32[2,3]) {
  %a = f32[2,3]{1,0} parameter(0)
  ROOT %fusion.1 = (f32[3,2]{1,0}, f32[2,3]{1,0}) fusion(%a), kind=kLoop, calls=%fused
  %other.2 = f32[2,3]{1,0} fusion(%a), kind=kLoop, calls=%missing
}
"""


def test_profile_classes_read_tuple_shapes_and_name_what_they_cannot_explain():
    classes = classify(MULTI_OUTPUT_TRANSPOSE)
    assert classes["fusion.1"] == ("data movement", "(f32[3,2]{1,0}, f32[2,3]{1,0})")
    assert classes["other.2"][0] == "unclassified"


def test_all_reduce_operands_are_counted_from_the_result_shape():
    text = "\n".join(
        [
            "ENTRY %main.9 (a: f32[32], b: f32[3,3,64,64], c: f32[64], x: f32[8]) -> f32[8] {",
            "  %all-reduce.3 = (f32[32]{0}, f32[3,3,64,64]{3,2,1,0}, /*index=2*/f32[64]{0}) all-reduce(%a, %b, %c)",
            '  %fusion.2 = f32[8]{0} fusion(%x), kind=kLoop, metadata={op_name="all-reduce("}',
            "  ROOT %all-reduce-start.1 = f32[8]{0} all-reduce-start(%fusion.2), channel_id=2",
            "}",
        ]
    )
    assert cpu_all_reduce.all_reduce_operands(text) == [3, 1]


@pytest.mark.parametrize(
    "args, message", [(["--devices", "1"], "--devices 1: must be at least 2"), (["--rounds", "0"], "--rounds 0")]
)
def test_cpu_all_reduce_refuses_bad_arguments(args, message):
    with pytest.raises(SystemExit, match=message):
        cpu_all_reduce.main(args)


@pytest.mark.parametrize("args", [["--devices", "1"], ["--trials", "0"], ["--timeout", "0"]])
def test_cpu_collective_hang_refuses_bad_arguments(args):
    with pytest.raises(SystemExit, match="need --devices >= 2, --trials >= 1, --timeout > 0"):
        cpu_collective_hang.main(args)


def test_all_reducing_calls_finish_when_each_is_waited_for():
    # what the trainer does on a split CPU; a fresh process with 2 devices (the suite's has 8)
    assert cpu_collective_hang.run_trial(cpu_collective_hang.MODES[0], devices=2, timeout=120)


def test_the_network_under_shard_map_sums_its_gradient_in_one_operand():
    partitioner, one_pcast = cpu_all_reduce.toy_gradients(devices=2, rounds=1, layers=3, calls=1)
    assert partitioner["operands"] == [6]  # a kernel and a bias per layer, combined into one all-reduce
    assert one_pcast["operands"] == [1] and one_pcast["max_difference"] < 1e-6
