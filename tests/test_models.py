"""Models: LoRA presets resolve to real modules, bad targets and layers are refused before training."""

from __future__ import annotations

import pytest
import torch

from experiments import models as M
from harness.cli import main


@pytest.fixture(scope="module")
def tiny():
    return M.load_model(M.TINY)


def test_tiny_model_is_identical_in_every_process(tiny):
    again = M.load_model(M.TINY)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values(), strict=True))
    tok = M.tiny_tokenizer()
    assert tok.chat_template and tok.pad_token and len(tok) == tiny.config.vocab_size


@pytest.mark.parametrize(("preset", "modules", "layers"), [
    ("qv", ["q_proj", "v_proj"], None),
    ("qkvo", ["q_proj", "k_proj", "v_proj", "o_proj"], None),
    ("all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], None),
    ("all-linear-last-half", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], [2, 3]),
])
def test_presets_resolve_to_real_modules(tiny, preset, modules, layers):
    from peft import LoraConfig, get_peft_model

    got_modules, got_layers = M.resolve_lora_targets(preset, tiny)
    assert sorted(got_modules) == sorted(modules) and got_layers == layers
    peft_model = get_peft_model(M.load_model(M.TINY), LoraConfig(r=2, target_modules=got_modules,
                                                                 layers_to_transform=got_layers))
    wrapped = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    expected_layers = layers if layers is not None else range(4)
    assert len(wrapped) == len(modules) * len(expected_layers)
    assert all(int(n.split(".layers.")[1].split(".")[0]) in expected_layers for n in wrapped)


def test_unknown_targets_listed_with_real_names(tiny):
    with pytest.raises(M.ModelError) as info:
        M.resolve_lora_targets(["q_proj", "query_key_value"], tiny)
    message = str(info.value)
    assert "'query_key_value'" in message and "q_proj, up_proj, v_proj" in message
    assert "'q_proj' not" not in message  # the valid one is not blamed


def test_layer_selection(tiny):
    n = M.num_layers(tiny)
    assert M.select_layers("last_half", n) == [2, 3]
    assert M.select_layers("last:1", n) == [3]
    assert M.select_layers("first:3", n) == [0, 1, 2]
    assert M.select_layers([-1, 0], n) == [0, 3]
    with pytest.raises(M.ModelError, match="out of range"):
        M.select_layers([7], n)
    with pytest.raises(M.ModelError, match="has 4"):
        M.select_layers("last:5", n)


def test_bad_targets_rejected_before_training(grid_file, tmp_path, capsys):
    grid = grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, method: dpo_lora}
        variants:
          - {lora: {targets: [q_proj, qkv_proj]}}
          - {method: partial_ft, partial_ft: {layers: [9]}}
    """)
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"{grid}: variants[0]: lora.targets: module(s) 'qkv_proj' not in this model" in err
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err
    assert f"{grid}: variants[1]: partial_ft.layers: layer index(es) [9] out of range" in err
    assert not (results / "mlflow.db").exists()  # nothing was trained or even tracked


@pytest.mark.slow
def test_smollm2_materialises_from_gguf():
    path = M.materialise_smollm2()
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    model = M.load_model(M.SMOLLM2)
    assert model.config.num_hidden_layers == 30 and getattr(model, "hf_quantizer", None) is None
    assert M.linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                            "v_proj"]
    tok = M.load_tokenizer(M.SMOLLM2)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # the dequantised weights are the real model, not noise
