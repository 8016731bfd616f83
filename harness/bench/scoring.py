"""Benchmark: scoring preference pairs with the prompt computed once for both sides, against each side whole.

    python -m harness.bench.scoring [--model smollm2-135m-instruct] [--repeats 3]
                                    [--out results/benchmarks/scoring.json]

"Whole" scores chosen and rejected as two full sequences, the prompt in each (what TRL's DPOTrainer does in its
concatenated forward, and what the measurement did before); "shared" (`experiments.scoring.shared_prompt_logps`,
what the measurement does now) runs the prompt once and continues both sides from its key/value cache. Two sets
of pairs: the built-in held-out pairs (short prompts) and the same pairs behind a ~1,200-character context
(long prompts, as in retrieval-style data). Reports the best of `--repeats` wall times of each, the tokens each
way passes through the model (padding included) and the largest margin difference between the two ways; and,
for scale, the tokens/s of a bare forward of 8 x 200 random tokens (no scoring, last position's logits only).
Run it alone: anything else on the machine shows up in the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _long_prompts(rows: list[dict], context: str) -> list[dict]:
    out = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = prompt[:-1] + [{**prompt[-1], "content": f"Context: {context}\n\n{prompt[-1]['content']}"}]
        else:
            prompt = f"Context: {context}\n\n{prompt}"
        out.append({**row, "prompt": prompt})
    return out


def _tokens(model, fn) -> tuple[object, int]:
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        hook.remove()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (eval.batch_size)")
    p.add_argument("--out", default="results/benchmarks/scoring.json")
    args = p.parse_args(argv)


    import torch

    from experiments import data as D
    from experiments import device as dev
    from experiments import evaluate as E
    from experiments import models as M
    from experiments import scoring as S
    from harness.bench.throughput import machine

    tok = M.load_padded_tokenizer(args.model, Path.cwd())
    model = M.load_model(args.model, base_dir=Path.cwd(), vocab_size=len(tok)).to(dev.pick_device())
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")
    context = " ".join(E.neutral_paragraphs())[:1200]
    sets = {"built-in held-out pairs": rows,
            "the same pairs behind a ~1,200-character context": _long_prompts(rows, context)}
    report = {"command": "python -m harness.bench.scoring " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "model": args.model,
              "dtype": str(next(model.parameters()).dtype), "batch_size": args.batch_size, "sets": {}}
    pad = tok.pad_token_id
    with S.inference(model):
        for name, data in sets.items():
            pairs, _ = E.encode_pairs(tok, data, list(range(len(data))), "eval", 1024)
            ways = {"whole": S.separate_logps, "shared": S.shared_prompt_logps}
            result: dict = {"pairs": len(pairs),
                            "mean_prompt_tokens": sum(len(x.prompt_ids) for x in pairs) / len(pairs),
                            "mean_completion_tokens": sum(len(x.chosen_ids) + len(x.rejected_ids)
                                                          for x in pairs) / (2 * len(pairs))}
            scores = {}
            for way, fn in ways.items():
                scores[way], tokens = _tokens(model, lambda fn=fn: fn(model, pairs, pad, args.batch_size))
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.monotonic()
                    fn(model, pairs, pad, args.batch_size)
                    best = min(best, time.monotonic() - t0)
                result[way] = {"seconds": best, "tokens": tokens, "seconds_per_pair": best / len(pairs)}
                print(f"{name}: {way} {best:.2f} s, {tokens} tokens", file=sys.stderr, flush=True)
            result["speedup"] = result["whole"]["seconds"] / result["shared"]["seconds"]
            result["max_margin_difference"] = max(abs((a[0] - a[1]) - (b[0] - b[1]))
                                                  for a, b in zip(scores["whole"], scores["shared"], strict=True))
            report["sets"][name] = result
        # the ceiling: a bare forward (last position's logits only) of random tokens, 8 rows of 200
        tokens = torch.randint(0, len(tok), (8, 200), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(next(model.parameters()).device)
        model(input_ids=tokens, logits_to_keep=1)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.monotonic()
            model(input_ids=tokens, logits_to_keep=1)
            best = min(best, time.monotonic() - t0)
        report["bare_forward_tokens_per_second"] = tokens.numel() / best
        for r in report["sets"].values():
            for way in ("whole", "shared"):
                r[way]["tokens_per_second"] = r[way]["tokens"] / r[way]["seconds"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = ["| pairs | prompt / completion tokens (mean) | each side whole | prompt shared | speed-up | "
             "max margin difference |", "|---|---|---|---|---|---|"]
    for name, r in report["sets"].items():
        lines.append(f"| {r['pairs']} {name} | {r['mean_prompt_tokens']:.0f} / {r['mean_completion_tokens']:.0f} | "
                     f"{r['whole']['seconds']:.1f} s ({r['whole']['tokens']} tokens) | "
                     f"{r['shared']['seconds']:.1f} s ({r['shared']['tokens']} tokens) | {r['speedup']:.2f}× | "
                     f"{r['max_margin_difference']:.1e} nats |")
    lines.append(f"\nA bare forward of 8 × 200 tokens (last position's logits only): "
                 f"{report['bare_forward_tokens_per_second']:.0f} tokens/s; scoring each side whole: "
                 + ", ".join(f"{r['whole']['tokens_per_second']:.0f}" for r in report["sets"].values())
                 + " tokens/s (padding included).")
    table = "\n".join(lines)
    where = report["machine"]["gpu"] or f"{report['machine']['cpu']} ({report['machine']['cores']} cores)"
    out.with_suffix(".md").write_text(f"Recorded {report['date']} on {where}, {report['dtype']}, "
                                      f"`{report['command']}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
