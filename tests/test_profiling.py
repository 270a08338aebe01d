"""logging.profile: kernel families, the per-step report, the profiler's window and files; bad values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from retnet_train.config import ConfigError, load_config
from retnet_train.train.profiling import StepProfiler, kernel_family, kernel_table

SYN = ["model=retnet_tiny", "trainer.data_source=synthetic"]


@pytest.mark.parametrize("name,family", [
    ("segment_outputs_kernel", "retention"),
    ("chunk_bwd_kernel_dqkwg", "retention"),  # fla's
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off",
     "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("aten::addmm", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("norm_gate_backward_kernel", "norm + gate"),
    ("_liger_cross_entropy_kernel", "loss"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_3", "compiled elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("some_new_kernel", "other"),
])
def test_kernel_families(name, family):
    assert kernel_family(name) == family


def test_report_is_per_step_and_shares_add_up():
    times = {"nvjet_gemm": (60.0, 6), "segment_states_kernel": (30.0, 3), "triton_poi_fused_add_0": (10.0, 3)}
    text = kernel_table(times, steps=3, top=2, header="steps 4-6 on rank 0 (test)")
    assert text.startswith("steps 4-6 on rank 0 (test): 33.33 ms per step in 4 kernels")
    fam = {line.split()[0]: line.split()[-2:] for line in text.splitlines()[3:6]}
    assert fam == {"matmul": ["20.00", "60.0%"], "retention": ["10.00", "30.0%"], "compiled": ["3.33", "10.0%"]}
    listed = [line for line in text.splitlines() if " / " in line and line.split()[0][0].isdigit()]
    assert len(listed) == 2 and "matmul / nvjet_gemm" in listed[0] and listed[0].split()[:2] == ["20.000", "2.0"]


def test_report_lists_whole_kernel_names():
    # inductor's fused names run past 150 characters; their numbered suffix tells kernels apart
    long_name = "triton_red_fused_" + "_".join(["native_layer_norm_backward"] * 8) + "_17"
    text = kernel_table({long_name: (3.0, 3)}, steps=3, top=1, header="h")
    assert text.splitlines()[-1].endswith("compiled elementwise / " + long_name)


def test_report_says_how_long_the_device_waited_within_a_step():
    times = {"nvjet_gemm": (60.0, 6), "segment_states_kernel": (30.0, 3)}  # 30 ms busy per step
    text = kernel_table(times, steps=3, top=2, header="steps 4-6 on rank 0 (test)", wall_ms=40.0)
    assert text.splitlines()[1] == ("wall 40.00 ms per step: the device waited 10.00 ms of it (25.0%; "
                                    "the profiler's own host work included)")
    # kernels on several streams can sum to more than the wall: no negative wait
    assert "waited 0.00 ms" in kernel_table(times, steps=3, top=2, header="h", wall_ms=25.0)
    assert "wall" not in kernel_table(times, steps=3, top=2, header="h")


def test_ranges_on_the_gpu_timeline_do_not_count_their_kernels_twice():
    """A record_function range shows on the GPU as a span over its kernels (is_user_annotation):
    the kernels count, the span does not."""
    from retnet_train.train.profiling import event_times

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, device_type, ms, annotation=False, cpu_ms=0.0):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=ms * 1e3, count=1,
                               is_user_annotation=annotation, self_cpu_time_total=cpu_ms * 1e3)

    events = [event("multi_tensor_apply_kernel", cuda, 16.0), event("Optimizer.step#AdamW.step", cuda, 16.0, True),
              event("nvjet_gemm", cuda, 90.0), event("aten::mm", cpu, 0.0, cpu_ms=2.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert event_times(prof, torch.device("cuda")) == {"multi_tensor_apply_kernel": (16.0, 1), "nvjet_gemm": (90.0, 1)}
    assert event_times(prof, torch.device("cpu")) == {"aten::mm": (2.0, 1)}


def _span(name, start, end, device_type=torch.autograd.DeviceType.CUDA, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device_type,
                           is_user_annotation=annotation)


def test_device_gaps_are_where_no_kernel_runs_on_any_stream():
    from retnet_train.train.profiling import device_gaps

    events = [_span("optimizer", 0, 100), _span("Optimizer.step#AdamW.step", 0, 300, annotation=True),
              _span("embedding", 400, 450),  # 300 us after the optimizer's kernel: the step boundary
              _span("matmul", 455, 600), _span("side_stream", 500, 700),  # overlaps: busy until 700
              _span("retention", 710, 800), _span("aten::mm", 800, 5000, torch.autograd.DeviceType.CPU),
              _span("loss", 900, 950)]
    gaps = device_gaps(events, min_us=20.0)
    assert gaps == [(300, 100, "optimizer", "embedding"), (100, 800, "retention", "loss")]  # 5 and 10 us: below
    assert device_gaps([], 20.0) == []


def test_gap_lines_give_the_time_per_step_and_the_largest_first():
    from retnet_train.train.profiling import gap_lines

    text = gap_lines([(300.0, 100.0, "optimizer", "embedding"), (1500.0, 800.0, "retention", "loss")], steps=2,
                     top=1)
    lines = text.strip().splitlines()
    assert lines[0] == ("device idle gaps of 20 us or more: 1 per step, 0.90 ms per step; the largest (where in the "
                        "window, after which kernel, before which):")
    assert len(lines) == 2 and lines[1].split()[:4] == ["1.500", "ms", "at", "0.80"]
    assert lines[1].endswith("after retention  before loss")


def _cfg(**kw):
    return SimpleNamespace(**{"start": 2, "steps": 2, "ranks": [0], "trace": True, "top": 10, **kw})


def test_profiler_covers_its_steps_and_writes_report_and_trace(tmp_path):
    prof = StepProfiler(_cfg(), tmp_path, rank=0, device=torch.device("cpu"))
    a = torch.randn(64, 64)
    for step in range(1, 6):
        prof.step_begins(step)
        for _ in range(step):  # more matmuls in later steps: the window must hold steps 2 and 3 only
            a = torch.tanh(a @ a)
        prof.step_ended(step)
        assert (prof.prof is not None) == (step == 2)
    report = (tmp_path / "profile" / "kernels_rank0.txt").read_text()
    assert report.startswith("steps 2-3 on rank 0 (cpu)")
    assert "\nwall " not in report  # on a CPU the host is the device: no waiting to report
    mm = next(line for line in report.splitlines() if "matmul / aten::mm" in line)
    assert float(mm.split()[1]) == 2.5  # 2 + 3 matmuls over 2 steps
    assert json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())["traceEvents"]
    assert prof.finish() is None  # once only


def test_profiler_is_off_by_default_and_on_unlisted_ranks(tmp_path):
    for prof in (StepProfiler(_cfg(start=0), tmp_path, 0, torch.device("cpu")),
                 StepProfiler(_cfg(ranks=[1]), tmp_path, 0, torch.device("cpu"))):
        for step in range(1, 5):
            prof.step_begins(step)
            prof.step_ended(step)
    assert not (tmp_path / "profile").exists()


def test_a_run_that_ends_inside_the_window_still_writes(tmp_path):
    prof = StepProfiler(_cfg(start=1, steps=10, trace=False), tmp_path, 0, torch.device("cpu"))
    prof.step_begins(1)
    torch.randn(8, 8) @ torch.randn(8, 8)
    prof.step_ended(1)
    assert prof.finish(1).read_text().startswith("steps 1-1 on rank 0 (cpu)")
    assert not (tmp_path / "profile" / "trace_rank0.json").exists()


@pytest.mark.parametrize("override,key", [("logging.profile.steps=0", "logging.profile.steps"),
                                          ("logging.profile.start=-1", "logging.profile.start"),
                                          ("logging.profile.top=0", "logging.profile.top"),
                                          ("logging.profile.ranks=[0,-2]", "logging.profile.ranks")])
def test_bad_profile_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([*SYN, override])


@pytest.mark.gpu
def test_profiler_on_a_gpu_counts_device_kernels(tmp_path):
    dev = torch.device("cuda")
    prof = StepProfiler(_cfg(start=1, steps=1, trace=False), tmp_path, 0, dev)
    a = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    prof.step_begins(1)
    with torch.profiler.record_function("a_range_of_matmuls"):  # on the GPU timeline too: not a kernel
        for _ in range(4):
            a = a @ a
    prof.step_ended(1)
    report = prof.report.read_text()
    assert "a_range_of_matmuls" not in report
    assert "device idle gaps of 20 us or more:" in report
    assert f"on rank 0 ({torch.cuda.get_device_name(dev)})" in report and " kernels" in report.splitlines()[0]
    assert report.splitlines()[1].startswith("wall ") and "the device waited" in report.splitlines()[1]
    fam = {line.split()[0]: float(line.split()[1]) for line in report.splitlines()[4:] if line and line[0].isalpha()
           and len(line.split()) == 3}
    assert fam.get("matmul", 0) > 0
