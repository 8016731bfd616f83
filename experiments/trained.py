"""Trained models back from the store, for measuring without training (`python -m harness evaluate`).

A finished variant run's model (its adapter on its starting model, or its full weights) with its reference
(its base, or its `from:` stage's model) and its typed config (the `variant.yaml` it logged); or a model
named directly, with an optional reference.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments import models as M
from harness.core import runs as R
from harness.core.schema import flatten


@dataclass
class Loaded:
    model: Any
    reference: Any | None  # None: the model is scored on its own (or is a PEFT model: adapter disabled)
    tokenizer: Any
    label: str  # for output file names
    config: dict = field(default_factory=dict)  # the run's flat typed config ({} for a model named directly)


class LoadError(LookupError):
    """The run or model cannot be loaded; the message says why."""


def load_models(name: str, base: str | None) -> Loaded:
    """A model by name or folder, and an optional reference to measure it against."""
    tok = M.load_padded_tokenizer(name, Path.cwd())
    model = M.load_model(name, base_dir=Path.cwd(), vocab_size=len(tok))
    reference = M.load_model(base, base_dir=Path.cwd(), vocab_size=len(tok)) if base else None
    label = Path(name).name + (f"-vs-{Path(base).name}" if base else "")
    return Loaded(model, reference, tok, label)


def run_config(client, run_id: str) -> dict:
    """The flat typed config a variant run logged (`variant.yaml`)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, R.VARIANT_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises its own exception types
            return {}
        return flatten(yaml.safe_load(Path(path).read_text()) or {})


def load_run(run_id: str, results: Path, base: str | None) -> Loaded:
    """A finished variant run's trained model and its reference (its base, or its `from:` stage's model)."""
    client, _ = R.client_for(results)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow's RestException
        raise LoadError(f"no run {run_id} in {results}") from None
    tags = run.data.tags
    if not R.is_variant_run(run) or run.info.status != "FINISHED":
        raise LoadError(f"run {run_id} is not a FINISHED variant run (kind {tags.get(R.TAG_KIND)}, "
                        f"{run.info.status})")
    config = run_config(client, run_id)
    stage = tags.get(R.TAG_STAGE)
    start = str(results / "runs" / stage / "model") if stage else config.get("base_model",
                                                                             run.data.params.get("base_model"))
    if stage and not Path(start, "config.json").is_file():
        raise LoadError(f"the run starts from stage {stage}, whose model {start} is not on this machine")
    # a stage's saved tokenizer carries the template it trained with; a base model gets the declared one again
    tok = M.load_padded_tokenizer(start, Path.cwd(), None if stage else config.get("chat_template"))
    tmp = tempfile.mkdtemp(prefix="harness-evaluate-")
    names = {a.path for a in client.list_artifacts(run_id)}
    if "adapter" in names:
        from peft import PeftModel

        model = PeftModel.from_pretrained(M.load_model(start, base_dir=Path.cwd(), vocab_size=len(tok)),
                                          client.download_artifacts(run_id, "adapter", tmp))
    else:
        local = results / "runs" / tags[R.TAG_VARIANT] / "model"
        folder = (client.download_artifacts(run_id, "model", tmp) if "model" in names
                  else str(local) if (local / "config.json").is_file() else None)
        if folder is None:
            raise LoadError(f"run {run_id} logged no weights (a full method without save_weights: true)")
        model = M.load_model(folder)
        base = base or start
    reference = M.load_model(base, base_dir=Path.cwd(), vocab_size=len(tok)) if base else None
    label = tags.get(R.RUN_NAME_TAG, run_id).replace("·", "_")
    return Loaded(model, reference, tok, label, config)
