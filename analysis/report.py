"""The writeup of a grid, generated from its logged runs only.

    python -m harness report two_round                 # latest finished run of every variant of the grid
    python -m harness report <parent run id>           # the variants one invocation ran or reused
    python -m harness report two_round --results DIR   # another results folder

Writes `<results>/<grid>/report.md` and its PNG figures next to it, the same page with the figures inside as
`report.html` (what MLflow's artifact viewer can show), and logs them (under `report/`) to the grid's parent run.
Every number comes from the runs' metrics and per-pair tables (`eval/pairs.csv`); the text around the numbers is
chosen by the numbers (an interval that covers zero is said to be "not distinguishable from zero"; when the
report makes several tests, a Holm-adjusted p-value of 0.05 or more is), never written in advance. Seed
replicates of a variant are pooled (see `analysis.groups` and `analysis.stats`).

The report is a list of sections: `analysis.groups.compute` computes everything once (groups, comparisons, the
family of tests), and each of `analysis.sections.SECTIONS` words one section of it (`analysis.wording` and
`analysis.signal` hold the words).
"""

from __future__ import annotations

from pathlib import Path

from analysis import webpage
from analysis.groups import AXES_ORDER, Group, build_groups, compare, compute, length_split
from analysis.load import Study, load_study
from analysis.sections import SECTIONS
from analysis.signal import describe_signal, signal_caveats, signal_notes, stage_sections
from analysis.stats import fmt
from analysis.wording import _table, comparison_sections, describe_movement
from harness.core.tracking import MlflowTracker

# what other modules and the tests import from here
__all__ = ["AXES_ORDER", "Group", "_table", "build", "build_groups", "compare", "comparison_sections",
           "describe_movement", "describe_signal", "fmt", "length_split", "signal_caveats", "signal_notes",
           "stage_sections", "write_report"]


def build(study: Study, out_dir: Path, *, target: str) -> Path:
    """Write `out_dir/report.md` (and its figures, and `report.html`): compute once, then every section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    computed = compute(study, out_dir, target=target)
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(computed)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    webpage.write_html(path)  # the same page with its figures inside, for MLflow's artifact viewer
    return path


def write_report(target: str, results_dir: Path) -> Path:
    """Load, write `<results>/<grid>/report.md` with its figures, log them to the parent run."""
    study = load_study(target, results_dir)
    out_dir = results_dir / study.grid
    path = build(study, out_dir, target=target)
    if study.parent_run_id:
        tracker = MlflowTracker(study.uri, study.parent_run_id)
        for f in sorted(out_dir.iterdir()):
            if f.suffix in (".md", ".html", ".png"):
                tracker.log_artifact(f, "report")
    return path
