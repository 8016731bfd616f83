"""Margin measurement cross-checks on the in-process tiny model: the harness's log-probs against an independent
plain-transformers computation, and its DPO margin shift against TRL's own `rewards/margins`; the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import stats
from experiments import data as D
from experiments import evaluate as E
from experiments import models as M
from experiments import scoring as S


@pytest.fixture(scope="module")
def tiny():
    tok = M.tiny_tokenizer()
    return M.load_model(M.TINY, vocab_size=len(tok)).eval(), tok


def independent_logp(model, tok, prompt: list, completion: list, max_length: int) -> float:
    """Summed log-prob of the completion tokens, written from scratch: chat template, one unpadded sequence,
    log_softmax and gather in float64. No harness helper is used."""
    prompt_ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    n = len(prompt_ids)
    assert full[:n] == list(prompt_ids)  # this template renders the prompt as a prefix
    ids = torch.tensor([list(full)[:max_length]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    per_token = logp[torch.arange(len(targets)), targets]
    return float(per_token[n - 1:].sum())


@pytest.mark.parametrize("max_length", [1024, 60])  # 60 truncates the completions of most pairs
def test_margin_equals_independent_computation(tiny, max_length):
    model, tok = tiny
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:6]
    pairs, dropped = E.encode_pairs(tok, rows, list(range(6)), "eval", max_length)
    assert dropped == 0 and len(pairs) == 6
    with S.inference(model):
        got = S.pair_logps(model, pairs, tok.pad_token_id, batch_size=4)  # batched, padded, sorted by length
    for (c, r), row in zip(got, rows, strict=True):
        want_c = independent_logp(model, tok, row["prompt"], row["chosen"], max_length)
        want_r = independent_logp(model, tok, row["prompt"], row["rejected"], max_length)
        assert abs(c - want_c) <= 1e-4 * max(1.0, abs(want_c))
        assert abs(r - want_r) <= 1e-4 * max(1.0, abs(want_r))
        assert abs((c - r) - (want_c - want_r)) <= 1e-4 * max(1.0, abs(want_c - want_r))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_prompt_shared_between_the_two_sides_scores_as_whole_sequences_with_fewer_tokens(tiny, batch_size):
    """The prompt computed once and continued from its key/value cache for both sides (left-padded prompts of
    different lengths, right-padded completions) gives the sums of scoring each side whole; with long prompts it
    passes far fewer tokens through the model, and `pair_logps` takes it."""
    model, tok = tiny
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:7]
    context = " ".join(E.neutral_paragraphs())[:1400]
    rows = [{**r, "prompt": r["prompt"][:-1] + [{**r["prompt"][-1],
                                                 "content": context[:800 + 80 * i] + r["prompt"][-1]["content"]}]}
            for i, r in enumerate(rows)]  # long prompts, of different lengths
    pairs, _ = E.encode_pairs(tok, rows, list(range(7)), "eval", 1024)
    assert len({len(p.prompt_ids) for p in pairs}) > 1  # the padding of the prompts is exercised
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with S.inference(model):
            shared = S.shared_prompt_logps(model, pairs, tok.pad_token_id, batch_size)
            shared_tokens = sum(seen)
            seen.clear()
            whole = S.separate_logps(model, pairs, tok.pad_token_id, batch_size)
            whole_tokens = sum(seen)
            seen.clear()
            chosen = S.pair_logps(model, pairs, tok.pad_token_id, batch_size)
    finally:
        hook.remove()
    assert shared is not None and len(shared) == len(pairs)
    plan = S.planned_tokens(pairs, batch_size)
    assert plan == {"whole": whole_tokens, "shared": shared_tokens}  # the plan counts what runs
    assert shared_tokens < S.SHARE_BELOW * whole_tokens  # with these prompts, sharing them is cheaper ...
    assert chosen == shared  # ... and pair_logps takes it
    for (c, r), (c0, r0) in zip(shared, whole, strict=True):  # sums of ~10^2-10^3 nats in float32
        assert c == pytest.approx(c0, rel=1e-6, abs=1e-5) and r == pytest.approx(r0, rel=1e-6, abs=1e-5)
        assert c - r == pytest.approx(c0 - r0, abs=1e-6 * (abs(c0) + abs(r0)) + 1e-5)
    if batch_size == 1:  # one pair at a time: its prompt once, then its two sides padded to the longer
        assert whole_tokens == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        assert shared_tokens == sum(len(p.prompt_ids) + 2 * max(len(p.chosen_ids), len(p.rejected_ids))
                                    for p in pairs)


def test_short_prompts_are_scored_as_whole_sequences(tiny):
    """The built-in pairs (short prompts, sides of very different lengths) save too few tokens shared: pair_logps
    scores them whole, exactly as before the shared path existed."""
    model, tok = tiny
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:8]
    pairs, _ = E.encode_pairs(tok, rows, list(range(8)), "eval", 1024)
    plan = S.planned_tokens(pairs, 8)
    assert plan["shared"] >= S.SHARE_BELOW * plan["whole"]
    with S.inference(model):
        assert S.pair_logps(model, pairs, tok.pad_token_id, 8) == S.separate_logps(model, pairs, tok.pad_token_id, 8)


def test_fully_truncated_pairs_are_dropped_like_trl(tiny):
    _, tok = tiny
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:4]
    pairs, dropped = E.encode_pairs(tok, rows, list(range(4)), "eval", max_length=8)
    assert (len(pairs), dropped) == (0, 4)


def test_dpo_margin_shift_times_beta_equals_trl_rewards_margins(tmp_path):
    """After a few DPO steps, on one batch at that checkpoint: beta x the harness's mean margin shift (policy vs
    adapter-disabled reference) equals TRL's `rewards/margins` for the same batch, and the harness's log-probs
    equal TRL's `logps/chosen` and `logps/rejected`.

    The batch is the training pairs, the batch TRL's logged `rewards/margins` is about. Summed log-probs here
    are ~800 nats in float32 (both sides), so their rounding is ~1e-4 nats: the margins, differences of four
    such sums, agree to about that absolute amount; the check is relative 1e-4 with a floor of 8 float32
    steps of the largest sum, on the unscaled log-ratios."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    beta, n = 0.3, 8
    tok = M.tiny_tokenizer()
    model = M.load_model(M.TINY, vocab_size=len(tok))
    rows = D.read_rows(D.BUILTIN_DIR / "train.jsonl")
    idx = D.select_indices(len(rows), n, 0)
    batch = D.preference_rows([rows[i] for i in idx])
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=n,
                     max_steps=3, learning_rate=1e-2, beta=beta, max_length=256, report_to="none", use_cpu=True,
                     bf16=False,  # TRL's default is bf16 autocast even on CPU; the measurement computes in fp32
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(batch),
                         processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    trl = trainer.evaluate(eval_dataset=Dataset.from_list(batch))  # one batch of n: TRL's mean is over these n

    setup = E.Setup(eval_rows=batch, eval_indices=idx, train_rows=None, train_indices=[], max_length=256,
                    batch_size=5, beta=beta, probe_prompts=E.probe_prompts()[:2],
                    neutral_text=E.neutral_paragraphs()[:2])
    baseline = E.before(trainer.model, tok, setup)  # adapter disabled: the DPO reference, no copy
    table, metrics = E.after(trainer.model, tok, baseline)

    shift = metrics["eval/margin_shift_mean"]
    assert abs(shift) > 0.5  # training moved the margins, so the check is not 0 == 0
    # TRL's rewards are beta × log-ratios: compared unscaled, in nats, to a few float32 steps of the summed
    # log-probs they are differences of (not to an absolute that holds on one CPU's kernels and not another's)
    sums = [abs(r[k]) for r in table for k in ("logp_chosen_after", "logp_rejected_after")]
    nats = 8 * float(np.spacing(np.float32(max(sums))))
    assert shift == pytest.approx(trl["eval_rewards/margins"] / beta, rel=1e-4, abs=nats)
    assert metrics["eval/implicit_reward_margin_mean"] / beta == pytest.approx(trl["eval_rewards/margins"] / beta,
                                                                               rel=1e-4, abs=nats)
    assert np.mean([r["chosen_shift"] for r in table]) == pytest.approx(trl["eval_rewards/chosen"] / beta, rel=1e-4,
                                                                        abs=nats)
    assert np.mean([r["logp_chosen_after"] for r in table]) == pytest.approx(trl["eval_logps/chosen"], rel=1e-6)
    assert np.mean([r["logp_rejected_after"] for r in table]) == pytest.approx(trl["eval_logps/rejected"], rel=1e-6)
    assert metrics["drift/kl_mean"] > 0 and metrics["drift/weight_delta_norm"] > 0


def test_full_model_weight_delta_and_reference_numbers(tiny):
    """A full model measured against a changed copy of itself: weight delta norm is exact, and the shift is
    the change of margins between the two models."""
    model, tok = tiny
    changed = M.load_model(M.TINY, vocab_size=len(tok)).eval()
    with torch.no_grad():
        w = changed.model.layers[0].mlp.down_proj.weight
        w.add_(0.01)
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:4]
    setup = E.Setup(eval_rows=rows, eval_indices=list(range(4)), train_rows=None, train_indices=[], max_length=256,
                    probe_prompts=E.probe_prompts()[:2], neutral_text=E.neutral_paragraphs()[:2])
    table, metrics = E.measure(changed, tok, setup, reference=model)
    assert metrics["drift/weight_delta_norm"] == pytest.approx(0.01 * w.numel() ** 0.5, rel=1e-5)
    for r in table:
        assert r["margin_shift"] == pytest.approx(r["margin_after"] - r["margin_before"], abs=1e-9)
    alone, m_alone = E.measure(changed, tok, setup)
    assert [r["margin"] for r in alone] == pytest.approx([r["margin_after"] for r in table], rel=1e-5)
    assert m_alone["eval/accuracy"] == metrics["eval/accuracy_after"]


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_covers_a_known_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(loc=2.0, scale=1.0, size=200)
    est = stats.bootstrap_mean(values)
    assert est.lo < 2.0 < est.hi
    assert est.lo < est.mean < est.hi and est.mean == pytest.approx(values.mean())
    assert est.verdict() == "above zero" and est.p_value < 0.001


def test_zero_effect_is_not_distinguishable_from_zero():
    rng = np.random.default_rng(2)
    values = rng.normal(loc=0.0, scale=1.0, size=32)
    values -= values.mean()  # exactly zero mean
    est = stats.bootstrap_mean(values)
    assert est.covers_zero and est.verdict() == "not distinguishable from zero"
    assert est.p_value > 0.5


def test_bootstrap_is_deterministic_and_paired():
    rng = np.random.default_rng(3)
    a = rng.normal(size=32)
    assert stats.bootstrap_mean(a) == stats.bootstrap_mean(a)
    assert stats.bootstrap_mean(a, seed=1) != stats.bootstrap_mean(a)
    # paired: a large shared per-pair component cancels, so a small consistent difference is detected
    shared = rng.normal(scale=100, size=32)
    diff = stats.paired_difference(shared + 0.5 + rng.normal(scale=0.01, size=32), shared)
    assert diff.lo > 0.45 and diff.hi < 0.55
    with pytest.raises(ValueError, match="same pairs"):
        stats.paired_difference(a, a[:5])


def test_measurement_computes_in_fp32_through_a_trainers_autocast_wrapper():
    """A Trainer with bf16 leaves the model's forward wrapped in autocast (Accelerate's prepare); "after" must
    still compute like "before" did, or the shift would be rounding noise (as it was on an H100)."""
    from accelerate import Accelerator

    tok = M.tiny_tokenizer()
    model = M.load_model(M.TINY, vocab_size=len(tok))
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:6]
    pairs, _ = E.encode_pairs(tok, rows, list(range(6)), "eval", 1024)
    with S.inference(model):
        fp32 = S.pair_logps(model, pairs, tok.pad_token_id, batch_size=4)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a trainer in an earlier test fixed it to fp32
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    wrapper = model.__dict__.get("forward")
    assert wrapper is not None and "_original_forward" in model.__dict__  # what a bf16 Trainer leaves behind
    with torch.no_grad():
        through_wrapper = S.pair_logps(model, pairs, tok.pad_token_id, batch_size=4)
    # the wrapper does change the numbers: without the fix the measurement would read bf16 noise
    assert max(abs(a - b) for x, y in zip(fp32, through_wrapper, strict=True) for a, b in zip(x, y)) > 1e-3
    model.train()
    with S.inference(model):
        assert not model.training
        again = S.pair_logps(model, pairs, tok.pad_token_id, batch_size=4)
    assert again == fp32  # bit for bit: the same fp32 computation
    assert model.__dict__["forward"] is wrapper and model.training  # training continues as it was
