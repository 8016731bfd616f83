"""The house's shape: imports run one way, and a method is one record.

Layers, bottom to top: `harness.core` (schema, methods, variants, tracking, run queries, metrics) <-
`experiments` (what one variant does) <- `analysis` (reading logged results) <- the rest of `harness`
(the commands, grid loading, the run engine `harness.run`, the benchmarks `harness.bench`). A module may
import its own layer or lower ones, never a higher one, and an import inside a function counts too.

Within the top layer: the run engine imports none of the commands (it is what they call), and nothing of the
product imports the benchmarks (they are not product code).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from harness.cli import main
from harness.core import methods

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("harness.core", "experiments", "analysis", "harness")  # bottom to top


def layer_of(module: str) -> int | None:
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the tree, wherever it stands."""
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # the module or attribute each name comes from: `from harness import cli` is harness.cli
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


def upward_imports(source: str, module: str) -> list[str]:
    own = layer_of(module)
    bad = []
    for line, target in imported_modules(ast.parse(source), module):
        rank = layer_of(target)
        if own is not None and rank is not None and rank > own:
            bad.append(f"{module}:{line} imports {target} ({LAYERS[rank]} is above {LAYERS[own]})")
    return sorted(set(bad))


def project_modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("harness", "experiments", "analysis"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out.append((name, path))
    return out


def test_imports_run_one_way():
    modules = project_modules()
    assert len(modules) > 20 and any(m == "harness.core.schema" for m, _ in modules)
    offenders = [line for name, path in modules for line in upward_imports(path.read_text(), name)]
    assert not offenders, "imports that run back up:\n" + "\n".join(offenders)


COMMANDS = ("harness.cli", "harness.search", "harness.ui", "harness.server")
ENGINE, BENCHMARKS = "harness.run", "harness.bench"


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_imports(source: str, module: str) -> list[str]:
    """Imports that break a rule within the top layer: the engine reaching a command, the product a benchmark."""
    bad = []
    for line, target in imported_modules(ast.parse(source), module):
        if _within(module, ENGINE) and any(_within(target, c) for c in COMMANDS):
            bad.append(f"{module}:{line} imports {target} (the run engine imports no command)")
        if not _within(module, BENCHMARKS) and _within(target, BENCHMARKS):
            bad.append(f"{module}:{line} imports {target} (benchmarks are not product code)")
    return sorted(set(bad))


def test_the_engine_imports_no_command_and_nothing_imports_the_benchmarks():
    modules = project_modules()
    assert any(_within(m, ENGINE) for m, _ in modules) and any(_within(m, BENCHMARKS) for m, _ in modules)
    offenders = [line for name, path in modules for line in forbidden_imports(path.read_text(), name)]
    assert not offenders, "imports across the top layer's rooms:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module, source, expected", [
    ("harness.run.session", "def f():\n    from harness import ui\n", "imports harness.ui"),
    ("harness.run.ray.driver", "from harness.server import health\n", "imports harness.server.health"),
    ("harness.grid", "from harness.bench.throughput import machine\n", "imports harness.bench.throughput"),
    ("harness.cli", "from harness.run.session import run_grid\n", None),  # a command calls the engine
    ("harness.bench.scoring", "from harness.bench.throughput import machine\n", None),  # a benchmark, its own room
])
def test_the_room_rules_can_fail(module, source, expected):
    found = forbidden_imports(source, module)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0]


@pytest.mark.parametrize("module, source, expected", [
    ("experiments.common", "def f():\n    from harness.grid import Variant\n", "imports harness.grid"),
    ("harness.core.schema", "import experiments.models\n", "imports experiments.models"),
    ("analysis.report", "from harness import cli\n", "imports harness.cli"),
    ("experiments.common", "from . import models\n", None),  # relative, same layer
    ("experiments.trained", "from ..harness import executor\n", "imports harness.executor"),  # relative, up
    ("harness.core.variant", "from . import schema\n", None),  # same layer
    ("harness.cli", "from analysis.report import build\n", None),  # downward
])
def test_the_direction_check_can_fail(module, source, expected):
    found = upward_imports(source, module)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0]


TOY = '''
"""A fifth method for the registry test: supervised fine-tuning of the final norm only."""

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from experiments import common


def train(ctx):
    tokenizer = common.load_tokenizer(ctx)
    rows = common.audit_and_log(ctx, common.prepare_rows(ctx, "sft"), tokenizer, "sft")
    model = common.load_model(ctx, tokenizer)
    for name, param in model.named_parameters():
        param.requires_grad_(name == "model.norm.weight")
    trainer = SFTTrainer(model=model, args=SFTConfig(**common.trainer_args(ctx)),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[common.HarnessCallback(ctx)])
    return common.fit(trainer, ctx)
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "toy_norm_ft.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker process imports the method's module too
    record = methods.register(methods.Method(
        name="norm_ft", entry="toy_norm_ft:train", summary="fine-tunes the final norm only",
        sections=("data", "train", "eval"), data_kind="sft", name_parts=(("train.learning_rate", "lr"),),
        describe=lambda c: f"final-norm fine-tuning at learning rate {c.get('train.learning_rate')}"))
    yield record
    methods.unregister("norm_ft")


def test_a_fifth_method_needs_only_its_record(toy_method, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent("""
        name: toy
        defaults:
          base_model: tiny-random-llama
          data: {size: 4, max_length: 128}
          train: {max_steps: 1, batch_size: 2, learning_rate: 1e-2}
          dpo: {beta: 0.5}            # not a section of norm_ft: left out of its id and params
        variants:
          - {name: norm, method: norm_ft}
    """))
    results = tmp_path / "results"
    assert main(["plan", str(grid)]) == 0
    assert "norm·norm_ft·tiny·n4·e1·lr0.01" in capsys.readouterr().out
    assert main(["run", str(grid), "--results", str(results)]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy")
    [run] = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "norm_ft" and "dpo.beta" not in run.data.params
    changes = client.download_artifacts(run.info.run_id, "param_changes.json", str(tmp_path))
    import json

    moved = json.loads(Path(changes).read_text())
    assert [n for n, p in moved["params"].items() if p["changed"]] == ["model.norm.weight"]
    assert main(["report", "toy", "--results", str(results)]) == 0
    report = (results / "toy" / "report.md").read_text()
    assert "final-norm fine-tuning at learning rate 0.01" in report


def test_unknown_method_lists_the_registry(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: x\ndefaults: {method: dpo_lorra, base_model: tiny-random-llama}\n")
    assert main(["validate", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "defaults.method: unknown method 'dpo_lorra' — did you mean 'dpo_lora'?" in err
    assert "Available: sft, lora_sft, partial_ft, dpo_lora" in err


def test_docs_metric_table_is_the_catalogue():
    from harness.core.metrics import markdown_table

    page = (ROOT / "docs" / "measurement.md").read_text()
    start = "<!-- metric catalogue: generated by `python -m harness metrics`; do not edit by hand -->\n"
    body = page.split(start, 1)[1].split("\n<!-- end of metric catalogue -->", 1)[0]
    assert body == markdown_table()


def test_every_summary_metric_is_in_the_catalogue():
    """The keys a real measurement produces (tiny model, against a reference and alone) all have an entry."""
    from experiments import data as D
    from experiments import evaluate as E
    from experiments import models as M
    from harness.core import metrics

    tok = M.load_padded_tokenizer(M.TINY)
    model, reference = M.load_model(M.TINY, vocab_size=len(tok)), M.load_model(M.TINY, vocab_size=len(tok))
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:2]
    setup = E.Setup.standard(rows, train_rows=rows, train_indices=[0, 1], max_length=128, probe_length=4)
    setup.probe_prompts, setup.neutral_text = setup.probe_prompts[:2], setup.neutral_text[:1]
    keys = set(E.measure(model, tok, setup, reference)[1]) | set(E.measure(model, tok, setup)[1])
    assert {"eval/margin_shift_mean", "train_pairs/margin_shift_mean", "drift/kl_mean", "drift/ppl"} <= keys
    missing = sorted(k for k in keys if metrics.lookup(k) is None)
    assert not missing, f"metrics logged but not in the catalogue: {missing}"
    assert metrics.lookup("eval/margin_shift_mean").direction == "higher"
    assert metrics.lookup("drift/kl_mean").direction == "lower"
