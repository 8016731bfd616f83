"""The GPU benchmark's CPU path (`python -m harness.bench --gpu` with no CUDA device: tiny shapes), end to end in one
run (about 1.5-2 minutes on two cores): every part's section is written, its figures are computed from what was
measured, and MFU follows its stated formula. The GPU figures themselves come from results/benchmarks/gpu.sh.

    python -m pytest tests/test_gpu_bench.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.bench import gpu

ROOT = Path(__file__).resolve().parent.parent

# random:llama-mini's parameters, counted from its shape by hand (hidden 256, MLP 688, 4 layers, 4 query heads of
# 64, 2 key/value heads, a 32000-token vocabulary tied to the output): embedding + layers × (attention + MLP + two
# norms) + the final norm
MINI_N = 32000 * 256 + 4 * ((256 * 256 * 2 + 256 * 128 * 2) + 3 * 256 * 688 + 2 * 256) + 256


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # the CPU path, on any machine
    proc = subprocess.run([sys.executable, "-m", "harness.bench", "--gpu", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text(), proc


def _assert_speed_and_memory(v: dict, estimated: bool = True) -> None:
    assert v["num_tokens"] > 0 and v["train_seconds"] > 0 and v["steps"] >= 1
    assert v["tokens_per_second"] == pytest.approx(v["num_tokens"] / v["train_seconds"])
    mem = v["memory"]
    assert mem["peak_gb"] > 0
    if estimated:
        assert mem["estimate_gb"] > 0 and mem["estimate_parts_gb"]["weights"] > 0
        assert mem["peak_over_estimate"] == pytest.approx(mem["peak_gb"] / mem["estimate_gb"])


def test_without_cuda_it_runs_every_part_at_tiny_shapes_and_names_the_cpu(bench):
    report, md, proc = bench
    assert "no CUDA device: tiny shapes" in proc.stderr
    assert report["mode"] == "tiny" and report["device"] == "cpu" and report["machine"]["gpu"] is None
    assert list(report["sections"]) == list(gpu.PARTS)
    assert all(s["part_seconds"] > 0 for s in report["sections"].values())
    assert f"on CPU: {report['machine']['cpu']}" in md.splitlines()[0]
    for heading in ("### throughput", "### dpo_lora_vs_trl", "### bf16_base", "### jobs"):
        assert heading in md


def test_throughput_part_compares_the_harness_with_plain_scripts(bench):
    section = bench[0]["sections"]["throughput"]
    [record] = section["workloads"].values()
    assert len(record["plain"]["variants"]) == len(record["harness"]["variants"]) == 2  # the tiny sweep's betas
    assert record["ratio"] == pytest.approx(record["harness"]["wall_seconds"] / record["plain"]["wall_seconds"])
    assert all(v["num_tokens"] > 0 for v in record["plain"]["variants"])


def test_dpo_lora_part_states_its_flops_per_token_from_what_each_side_computed(bench):
    b = bench[0]["sections"]["dpo_lora_vs_trl"]
    assert b["n_params"] == MINI_N
    harness, plain = b["harness"], b["plain"]
    _assert_speed_and_memory(harness)
    _assert_speed_and_memory(plain, estimated=False)
    # LoRA on a frozen base: 4N a token; TRL's reference forward adds 2N. In fp32 the harness hands TRL the
    # reference log-probs its measurement took (no forward); the plain script runs it every step.
    assert harness["mfu"]["reference_forward"] is False and plain["mfu"]["reference_forward"] is True
    assert harness["mfu"]["flops_per_token"] == 4 * MINI_N and harness["mfu"]["flops_per_token_formula"] == "4N"
    assert plain["mfu"]["flops_per_token"] == 6 * MINI_N
    assert harness["steps"] == plain["steps"] == 2 and harness["num_tokens"] == plain["num_tokens"]  # same work
    assert b["tokens_per_second_ratio"] == pytest.approx(harness["tokens_per_second"] / plain["tokens_per_second"])
    for side in (harness, plain):  # a CPU has no peak figure: MFU is said to be not computed, not made up
        assert side["mfu"]["value"] is None and side["mfu"]["peak_source"].startswith("not computed")


def test_bf16_base_part_checks_the_estimate_of_a_bf16_stored_base(bench):
    c = bench[0]["sections"]["bf16_base"]
    assert c["base_dtype"] == "bf16" and c["precision"] == "bf16"
    _assert_speed_and_memory(c["harness"])
    assert c["harness"]["memory"]["estimate_parts_gb"]["weights"] == pytest.approx(2 * MINI_N / 1e9, rel=1e-6)
    # bf16 training computes the reference each step (the fp32 measurement's log-probs are not handed over)
    assert c["harness"]["mfu"]["flops_per_token"] == 6 * MINI_N


def test_jobs_part_runs_the_same_variants_two_and_four_at_once(bench):
    d = bench[0]["sections"]["jobs"]
    assert list(d["runs"]) == ["jobs2", "jobs4"] and d["variants"] == 4
    tokens = {}
    for run in d["runs"].values():
        assert len(run["variants"]) == 4
        for v in run["variants"].values():
            _assert_speed_and_memory(v)
        assert run["num_tokens"] == sum(v["num_tokens"] for v in run["variants"].values())
        assert run["grid_tokens_per_second"] == pytest.approx(run["num_tokens"] / run["wall_seconds"])
        tokens[run["jobs"]] = {name: v["num_tokens"] for name, v in run["variants"].items()}
    assert tokens[2] == tokens[4]  # running at once changes the speed, not the work


def test_mfu_divides_by_the_named_datasheet_peak():
    h100 = gpu.peak_flops("NVIDIA H100 80GB HBM3", None)
    assert h100["flops"] == 989e12 and "SXM" in h100["source"]
    assert gpu.peak_flops("NVIDIA H100 PCIe", None)["flops"] == 756e12
    assert gpu.peak_flops("NVIDIA H200", None)["flops"] == 989e12
    assert gpu.peak_flops("Some GPU", None)["flops"] is None
    assert gpu.peak_flops(None, 100.0) == {"flops": 100e12, "source": "--peak-tflops 100 (given on the command line)"}
    record = gpu.mfu(2000.0, 1_000_000_000, trains_base=False, reference_forward=True, peak=h100)
    assert record["flops_per_token"] == 6e9 and record["value"] == pytest.approx(2000 * 6e9 / 989e12)
    assert gpu.mfu(2000.0, 10, trains_base=True, reference_forward=False, peak=h100)["flops_per_token"] == 60


def test_the_output_file_names_the_device():
    assert gpu.default_out("NVIDIA H100 80GB HBM3", "gpu") == Path("results/benchmarks/gpu-nvidia-h100-80gb-hbm3.json")
    assert gpu.default_out(None, "tiny") == Path("results/benchmarks/gpu-cpu.json")


def test_a_run_of_some_parts_keeps_the_sections_this_device_wrote_before(tmp_path):
    """gpu.sh runs each part under its own timeout, into one file: the parts must add up, and another device's or
    mode's sections must not mix in."""
    out = tmp_path / "gpu.json"
    report = {"mode": "gpu", "machine": {"gpu": "NVIDIA H100 80GB HBM3"}}
    out.write_text(json.dumps({**report, "sections": {"jobs": {"runs": {}}}}))
    assert gpu._earlier(out, report) == {"jobs": {"runs": {}}}
    assert gpu._earlier(out, {**report, "machine": {"gpu": "NVIDIA H200"}}) == {}
    assert gpu._earlier(out, {**report, "mode": "tiny"}) == {}
    assert gpu._earlier(tmp_path / "absent.json", report) == {}
