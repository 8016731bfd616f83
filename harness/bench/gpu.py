"""Benchmark: issue 26's GPU figures in one short call -- throughput against plain TRL, tokens/s, peak memory
against the memory model's estimate, and model FLOPs utilisation, at 135M, 1B and 8B shapes.

    python -m harness.bench --gpu                   # on an H100/H200: about 6 minutes; see results/benchmarks/gpu.sh
    python -m harness.bench --gpu --tiny            # the same parts at tiny shapes (automatic without CUDA)
    python -m harness.bench --gpu --parts bf16_base,jobs --out results/benchmarks/gpu-x.json   # some parts

Four parts, each a section of the JSON (`sections.<part>`) and the markdown beside it:

  throughput        the single-variant and beta-sweep workloads of harness/bench/throughput.py (SmolLM2's shape),
                    through the harness and as plain TRL scripts
  dpo_lora_vs_trl   `random:llama-3.2-1b` DPO through LoRA, through the harness and as a plain TRL DPOTrainer + PEFT
                    script with the same settings: tokens/s, peak memory (the harness's against its estimate), MFU
  bf16_base         `random:llama-3.1-8b` with its frozen base stored in bf16 (`train.base_dtype: bf16`), a few
                    steps through the harness: peak memory against the estimate, tokens/s, MFU
  jobs              four small variants with `--jobs 2` and `--jobs 4`: several workers sharing one GPU

Tokens are TRL's own count (`num_tokens`: the attention mask's ones, chosen and rejected, padding excluded), over
the seconds `trainer.train()` took (the harness's measurement before and after training is not in them).

MFU = tokens/s × FLOPs per token ÷ the device's peak FLOP/s. FLOPs per token: 2N for a forward pass through N
parameters, 4N to also back-propagate to the activations, 6N to also compute the weights' gradients; so 4N for
LoRA on a frozen base (the adapters' own FLOPs are under 1% and left out), 6N for full fine-tuning, plus 2N when
the step also runs the DPO reference forward (TRL does each step; the harness hands it the reference log-probs
its measurement took when training computes in fp32, so none on a CPU). N counts every parameter of the base,
the embedding matrix included (an input embedding is a lookup, not a matmul: for an untied 8B that over-counts
N by ~7%); attention's sequence-length-dependent FLOPs (12 × layers × hidden × length a token) are left out,
under 5% at these lengths. The peak is the GPU's dense BF16 Tensor Core figure from NVIDIA's datasheet (PEAKS;
sparsity doubles it, not used), or --peak-tflops; a CPU has none here, so its MFU is not computed.
Run it alone: anything else on the machine shows up in the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from harness.bench import throughput as T

# (what the device's name contains, dense BF16 FLOP/s, where the figure comes from); first match wins
PEAKS = [
    ("H200", 989e12, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense"),
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet, PCIe: BF16 Tensor Core 1,513 TFLOPS with sparsity, 756 dense"),
    ("H100 NVL", 835e12, "NVIDIA H100 datasheet, NVL: BF16 Tensor Core 1,671 TFLOPS with sparsity, 835 dense"),
    ("H100", 989e12, "NVIDIA H100 datasheet, SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense"),
    ("A100", 312e12, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)"),
]
PARTS = ("throughput", "dpo_lora_vs_trl", "bf16_base", "jobs")
SMALL_GPU = "random:smollm2-135m"  # SmolLM2-135M's shape: times as SmolLM2 does, with no weights to stage

# What each part runs: at GPU size (short enough for one ~8-minute call), and tiny (a CPU test in well under
# 2 minutes on two cores). `eval_pairs` held-out pairs are measured before and after, not the built-in 32.
PLANS = {
    "gpu": {
        "throughput": {"model": None,  # SmolLM2 where its weights are here, else SMALL_GPU
                       "workloads": {"single": {"size": 12, "epochs": 2, "betas": [0.1], "jobs": [1]},
                                     "sweep": {"size": 4, "epochs": 1, "betas": [0.05, 0.1, 0.5], "jobs": [1]}},
                       "settings": {}},
        "dpo_lora_vs_trl": {"model": "random:llama-3.2-1b", "workload": {"size": 64, "epochs": 1, "betas": [0.1]},
                            "eval_pairs": 8, "settings": {"lora": {"rank": 16, "alpha": 32},
                                                          "train": {"batch_size": 8}, "data": {"max_length": 512},
                                                          "eval": {"probe_length": 8}}},
        "bf16_base": {"model": "random:llama-3.1-8b", "workload": {"size": 16, "epochs": 1, "betas": [0.1]},
                      "eval_pairs": 4, "settings": {"lora": {"rank": 16, "alpha": 32},
                                                    "train": {"batch_size": 4, "precision": "bf16",
                                                              "base_dtype": "bf16"},
                                                    "data": {"max_length": 512}, "eval": {"probe_length": 4}}},
        "jobs": {"model": SMALL_GPU, "workload": {"size": 8, "epochs": 1, "betas": [0.05, 0.1, 0.2, 0.5]},
                 "jobs": [2, 4], "eval_pairs": 8, "settings": {"eval": {"probe_length": 8}}},
    },
    "tiny": {
        "throughput": {"model": "random:llama-mini",
                       "workloads": {"sweep": {"size": 2, "epochs": 1, "betas": [0.05, 0.5], "jobs": [1]}},
                       "eval_pairs": 2, "settings": {"data": {"max_length": 128}, "eval": {"probe_length": 4}}},
        "dpo_lora_vs_trl": {"model": "random:llama-mini", "workload": {"size": 4, "epochs": 1, "betas": [0.1]},
                            "eval_pairs": 2, "settings": {"lora": {"rank": 16, "alpha": 32},
                                                          "train": {"batch_size": 2}, "data": {"max_length": 128},
                                                          "eval": {"probe_length": 4}}},
        "bf16_base": {"model": "random:llama-mini", "workload": {"size": 2, "epochs": 1, "betas": [0.1]},
                      "eval_pairs": 2, "settings": {"train": {"batch_size": 2, "precision": "bf16",
                                                              "base_dtype": "bf16"},
                                                    "data": {"max_length": 128}, "eval": {"probe_length": 4}}},
        "jobs": {"model": "random:llama-mini", "workload": {"size": 2, "epochs": 1, "betas": [0.05, 0.1, 0.2, 0.5]},
                 "jobs": [2, 4], "eval_pairs": 2, "settings": {"data": {"max_length": 128},
                                                               "eval": {"probe_length": 4}}},
    },
}


# ---------------------------------------------------------------- the figures: MFU, memory, tokens/s


def peak_flops(device_name: str | None, given_tflops: float | None) -> dict:
    """The peak FLOP/s MFU divides by, and where it comes from; None (with why) on a CPU or an unknown GPU."""
    if given_tflops:
        return {"flops": given_tflops * 1e12, "source": f"--peak-tflops {given_tflops:g} (given on the command line)"}
    if device_name is None:
        return {"flops": None, "source": "not computed: a CPU has no dense BF16 peak figure here (--peak-tflops "
                                         "gives a nominal one)"}
    for needle, flops, source in PEAKS:
        if needle in device_name:
            return {"flops": flops, "source": source}
    return {"flops": None, "source": f"not computed: no datasheet figure for {device_name!r} (--peak-tflops)"}


def flops_per_token(n_params: int, trains_base: bool, reference_forward: bool) -> tuple[int, str]:
    """Model FLOPs per processed token and the formula that gave them (see the module's docstring)."""
    passes = 6 if trains_base else 4
    formula = f"{passes}N" + (" + 2N (reference forward)" if reference_forward else "")
    return (passes + (2 if reference_forward else 0)) * n_params, formula


def mfu(tokens_per_second: float, n_params: int, trains_base: bool, reference_forward: bool, peak: dict) -> dict:
    """The MFU record: the value (None without a peak figure) and every number it was computed from."""
    per_token, formula = flops_per_token(n_params, trains_base, reference_forward)
    value = tokens_per_second * per_token / peak["flops"] if peak["flops"] else None
    return {"value": value, "flops_per_token": per_token, "flops_per_token_formula": formula,
            "formula": f"tokens/s × ({formula}) ÷ peak FLOP/s",
            "n_params": n_params, "trains_base": trains_base, "reference_forward": reference_forward,
            "peak_flops": peak["flops"], "peak_source": peak["source"]}


def memory_record(metrics: dict) -> dict:
    """The measured peak beside the memory model's estimate (experiments/memory.py), as the run logged them."""
    peak, estimate = metrics["memory/peak_gb"], metrics["memory/estimate_gb"]  # every run logs both
    parts = {k.removeprefix("memory/estimate_").removesuffix("_gb"): v for k, v in metrics.items()
             if k.startswith("memory/estimate_") and k != "memory/estimate_gb"}
    return {"peak_gb": peak, "estimate_gb": estimate, "peak_over_estimate": peak / estimate,
            "estimate_parts_gb": parts}


def n_params(model: str) -> int:
    """N: every parameter of the base model (tied embeddings once), counted on the meta device."""
    from experiments import models as M

    return sum(p.numel() for p in M.skeleton(model).parameters())


def _speed(tokens: float, seconds: float) -> dict:
    return {"num_tokens": tokens, "train_seconds": seconds, "tokens_per_second": tokens / seconds}


def harness_variants(results: Path, n: int, peak: dict) -> dict[str, dict]:
    """Each variant of a harness results folder, by name: tokens/s, peak memory against estimate, MFU -- read
    from what the run logged (its MLflow store), as analysis does."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    out = {}
    for run in client.search_runs(experiments, "tags.`harness.kind` = 'variant'"):
        m = run.data.metrics
        # TRL runs the reference forward each step unless the harness handed it the measurement's log-probs
        reference_forward = m.get("cache/reference_logps_reused", 0.0) == 0.0
        speed = _speed(m["train/num_tokens"], m["train/seconds"])
        out[run.data.tags["mlflow.runName"].split("·")[0]] = {
            **speed, "steps": int(m["train/global_step"]), "memory": memory_record(m),
            "mfu": mfu(speed["tokens_per_second"], n, False, reference_forward, peak)}
    return out


def plain_variant(run: dict, n: int, peak: dict) -> dict:
    """A plain TRL script's own report: tokens/s, peak memory (no estimate: nothing plans it), MFU."""
    speed = _speed(run["num_tokens"], run["train_seconds"])
    return {**speed, "steps": run["steps"], "wall_seconds": run["wall_seconds"],
            "memory": {"peak_gb": run["peak_bytes"] / 1e9}, "mfu": mfu(speed["tokens_per_second"], n, False, True,
                                                                      peak)}


# ---------------------------------------------------------------- the parts


def _settings(part: dict, work: Path) -> dict:
    """The part's grid sections, with its held-out pairs cut to `eval_pairs` (a file of the first ones)."""
    from experiments import data as D

    settings = {k: dict(v) for k, v in part["settings"].items()}
    if part.get("eval_pairs"):
        path = work / f"eval-{part['eval_pairs']}.jsonl"
        lines = (D.BUILTIN_DIR / D.BUILTIN_FILES["eval"]).read_text().splitlines()[:part["eval_pairs"]]
        path.write_text("\n".join(lines) + "\n")
        settings["data"] = {**settings.get("data", {}), "eval": str(path)}
    return settings


def run_throughput(part: dict, ctx: dict) -> dict:
    """(a) The throughput workloads, both ways, as `python -m harness.bench` runs them."""
    settings = _settings(part, ctx["work"]) if part.get("eval_pairs") else part["settings"]
    section = {"model": part["model"], "settings": settings, "workloads": {}}
    for key, record in T.run_workloads(part["model"], part["workloads"], ctx["work"], ctx["precision"],
                                       settings=settings):
        section["workloads"][key] = record
        ctx["save"]("throughput", section)  # after each workload: a part cut short keeps the ones it finished
    return section


def run_lora_vs_trl(part: dict, ctx: dict) -> dict:
    """(b) One DPO-LoRA variant through the harness and as a plain TRL DPOTrainer + PEFT script."""
    model, work, precision = part["model"], ctx["work"], ctx["precision"]
    settings, n = _settings(part, work), n_params(model)
    print(f"dpo_lora_vs_trl: plain TRL on {model} ...", file=sys.stderr, flush=True)
    plain = T._plain(T.plain_source(model, work), part["workload"], work, precision, T._plain_settings(settings))
    print(f"dpo_lora_vs_trl: harness on {model} ...", file=sys.stderr, flush=True)
    harness = T._harness(model, part["workload"], work, "bench_lora", precision, settings=settings)
    [variant] = harness_variants(T._results_folder(work, "bench_lora", 1, False), n, ctx["peak"]).values()
    [script] = plain["variants"]
    plain_record = plain_variant(script, n, ctx["peak"])
    return {"model": model, "n_params": n, "precision": precision, "settings": settings,
            "harness": {**variant, "wall_seconds": harness["wall_seconds"]}, "plain": plain_record,
            "tokens_per_second_ratio": variant["tokens_per_second"] / plain_record["tokens_per_second"],
            "wall_ratio": harness["wall_seconds"] / script["wall_seconds"]}


def run_bf16_base(part: dict, ctx: dict) -> dict:
    """(c) A large shape with a bf16-stored frozen base through the harness: does the memory model hold?"""
    model, work = part["model"], ctx["work"]
    settings, n = _settings(part, work), n_params(model)
    print(f"bf16_base: harness on {model} ...", file=sys.stderr, flush=True)
    harness = T._harness(model, part["workload"], work, "bench_bf16", "bf16", settings=settings)
    [variant] = harness_variants(T._results_folder(work, "bench_bf16", 1, False), n, ctx["peak"]).values()
    return {"model": model, "n_params": n, "precision": "bf16", "base_dtype": "bf16", "settings": settings,
            "harness": {**variant, "wall_seconds": harness["wall_seconds"]}}


def run_jobs(part: dict, ctx: dict) -> dict:
    """(d) The same small variants with several at once sharing the device."""
    model, work = part["model"], ctx["work"]
    settings, n = _settings(part, work), n_params(model)
    runs = {}
    for jobs in part["jobs"]:
        print(f"jobs: harness --jobs {jobs} on {model} ...", file=sys.stderr, flush=True)
        harness = T._harness(model, part["workload"], work, "bench_jobs", ctx["precision"], jobs, settings=settings)
        variants = harness_variants(T._results_folder(work, "bench_jobs", jobs, False), n, ctx["peak"])
        tokens = sum(v["num_tokens"] for v in variants.values())
        runs[f"jobs{jobs}"] = {"jobs": jobs, "wall_seconds": harness["wall_seconds"], "num_tokens": tokens,
                               "grid_tokens_per_second": tokens / harness["wall_seconds"],  # measuring included
                               "variants": variants}
    return {"model": model, "n_params": n, "precision": ctx["precision"], "settings": settings,
            "variants": len(part["workload"]["betas"]), "runs": runs}


RUNNERS = {"throughput": run_throughput, "dpo_lora_vs_trl": run_lora_vs_trl, "bf16_base": run_bf16_base,
           "jobs": run_jobs}


# ---------------------------------------------------------------- writing


def _pct(x: float | None) -> str:
    return "not computed" if x is None else f"{100 * x:.1f}%"


def _row(label: str, v: dict) -> str:
    mem = v["memory"]
    estimate = (f"{mem['estimate_gb']:.2f} GB ({mem['peak_over_estimate']:.2f}×)" if "estimate_gb" in mem
                else "—")
    return (f"| {label} | {v['tokens_per_second']:.0f} | {v['train_seconds']:.1f} s, {v['steps']} steps | "
            f"{mem['peak_gb']:.2f} GB | {estimate} | {v['mfu']['flops_per_token_formula']} | "
            f"{_pct(v['mfu']['value'])} |")


def markdown(report: dict) -> str:
    head = ["| run | tokens/s | training | peak memory | estimate (peak ÷ estimate) | FLOPs/token | MFU |",
            "|---|---|---|---|---|---|---|"]
    lines = [f"MFU peak: {report['peak']['source']}.", ""]
    s = report["sections"]
    if "throughput" in s:
        lines += [f"### throughput: harness against plain TRL scripts ({s['throughput']['model']})", "",
                  T.markdown({"workloads": s["throughput"]["workloads"]}), ""]
    if "dpo_lora_vs_trl" in s:
        b = s["dpo_lora_vs_trl"]
        lines += [f"### dpo_lora_vs_trl: {b['model']} (N = {b['n_params']:,}), DPO-LoRA, {b['precision']}", "", *head,
                  _row("harness", b["harness"]), _row("plain TRL + PEFT", b["plain"]), "",
                  (f"harness ÷ plain tokens/s: {b['tokens_per_second_ratio']:.2f}×; whole process "
                   f"{b['harness']['wall_seconds']:.0f} s (measuring included) against "
                   f"{b['plain']['wall_seconds']:.0f} s"), ""]
    if "bf16_base" in s:
        c = s["bf16_base"]
        lines += [f"### bf16_base: {c['model']} (N = {c['n_params']:,}), base stored in bf16", "", *head,
                  _row("harness", c["harness"]), ""]
    if "jobs" in s:
        d = s["jobs"]
        lines += [f"### jobs: {d['variants']} variants of {d['model']} at once on one device", "",
                  "| --jobs | whole grid | grid tokens/s (measuring included) | tokens/s per variant (training) |",
                  "|---|---|---|---|"]
        for r in d["runs"].values():
            per = ", ".join(f"{v['tokens_per_second']:.0f}" for v in r["variants"].values())
            lines.append(f"| {r['jobs']} | {r['wall_seconds']:.0f} s | {r['grid_tokens_per_second']:.0f} | {per} |")
        lines.append("")
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    m = report["machine"]
    where = m["gpu"] or f"CPU: {m['cpu']} ({m['cores']} cores), tiny shapes"
    out.with_suffix(".md").write_text(f"Recorded {report['date']} on {where}, `{report['command']}`\n\n"
                                      + markdown(report))


def default_out(gpu: str | None, mode: str) -> Path:
    """results/benchmarks/gpu-<the GPU's name>.json, or gpu-cpu-tiny.json: the file names the device."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "cpu"
    return Path(f"results/benchmarks/gpu-{slug}{'-tiny' if mode == 'tiny' and gpu else ''}.json")


def _earlier(out: Path, report: dict) -> dict:
    """The sections a previous --parts run wrote to `out` on this device in this mode (kept beside the new)."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    same = old.get("mode") == report["mode"] and old.get("machine", {}).get("gpu") == report["machine"]["gpu"]
    return old.get("sections", {}) if same else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench --gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", required=True, help="this benchmark (not the throughput one)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and step counts (automatic without CUDA)")
    p.add_argument("--parts", help=f"comma-separated, of {', '.join(PARTS)} (default all); the sections already "
                   "in --out from this device are kept")
    p.add_argument("--out", help="a .json file (and .md beside it), or a folder to write gpu-<device>.json in; "
                   "default results/benchmarks/gpu-<device>.json")
    p.add_argument("--peak-tflops", type=float, help="the peak MFU divides by, instead of the datasheet's")
    p.add_argument("--model", help="the throughput part's model (default: SmolLM2 if its weights are here, else "
                   f"{SMALL_GPU}; tiny: random:llama-mini)")
    args = p.parse_args(argv)
    # a timeout's SIGTERM ends this process through Python, so each child gets stopped (throughput.child)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = args.parts.split(",") if args.parts else list(PARTS)
    if unknown := [x for x in parts if x not in PARTS]:
        p.error(f"--parts: unknown {', '.join(map(repr, unknown))}; parts: {', '.join(PARTS)}")
    from experiments import device as dev

    device = dev.pick_device()
    mode = "tiny" if args.tiny or not device.startswith("cuda") else "gpu"
    if mode == "tiny" and not args.tiny:
        print("no CUDA device: tiny shapes and step counts (the CPU path)", file=sys.stderr)
    plan = {name: dict(part) for name, part in PLANS[mode].items()}
    plan["throughput"]["model"] = args.model or plan["throughput"]["model"] or _smollm2_or_shape()
    report = {"command": "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": T.machine(), "mode": mode,
              "device": device, "precision": dev.resolve_precision("auto", device), "sections": {}}
    report["peak"] = peak_flops(report["machine"]["gpu"], args.peak_tflops)
    out = default_out(report["machine"]["gpu"], mode)
    if args.out:
        out = Path(args.out) / out.name if Path(args.out).is_dir() else Path(args.out)
    if args.parts:
        report["sections"] = _earlier(out, report)
    with tempfile.TemporaryDirectory(prefix="harness-bench-gpu-") as tmp:
        def save(name: str, section: dict) -> None:
            report["sections"][name] = section
            write(report, out)

        ctx = {"work": Path(tmp), "precision": report["precision"], "peak": report["peak"], "save": save}
        for name in parts:
            t0 = time.monotonic()
            report["sections"][name] = {**RUNNERS[name](plan[name], ctx), "part_seconds": time.monotonic() - t0}
            write(report, out)  # after every part: a part cut short by its timeout keeps the ones before
    print(markdown(report))
    return 0


def _smollm2_or_shape() -> str:
    """SmolLM2 itself where its weights can be had here (staged on the GPU machine), else its shape."""
    from experiments import models as M

    try:
        return M.SMOLLM2 if M.weights_folder(M.SMOLLM2, Path.cwd()) else SMALL_GPU
    except M.ModelError:
        return SMALL_GPU


if __name__ == "__main__":
    sys.exit(main())
