"""The writeup of a search (an Optuna study run by `harness search`), from its study and its logged trials.

    python -m harness report search_beta_lr            # the experiment of a search: writes a study writeup

Writes `<results>/<study>/report.md` with figures: the optimisation history, each objective against each
searched parameter, the Pareto front (two objectives) with 95% CIs on the held-out shift, and parameter
importances (Optuna's evaluators); then the usual per-variant writeup of the best trial(s) in
`<results>/<study>/best/report.md`. Trials are read from the study's storage (named on the study's parent
run); their numbers from the runs they logged.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import figures, report, webpage  # noqa: E402
from analysis.load import Study, StudyError, load_study  # noqa: E402
from analysis.stats import fmt, fmt_ci  # noqa: E402
from harness.core import metrics as catalogue  # noqa: E402
from harness.core import runs as R  # noqa: E402
from harness.core.tracking import MlflowTracker  # noqa: E402


def is_search(target: str, results_dir: Path) -> bool:
    """Whether `target` names the experiment of a search (rather than of a grid)."""
    client, _ = R.client_for(results_dir)
    exp = client.get_experiment_by_name(target)
    return exp is not None and R.latest_search_run(client, exp.experiment_id) is not None


def open_study(parent, results_dir: Path):
    """The Optuna study a search parent run names (a journal file under results/)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    where = parent.data.tags.get(R.TAG_STORAGE, "")
    name = parent.data.tags.get(R.TAG_STUDY)
    if not where.startswith("journal:"):
        raise StudyError(f"study {name!r} lives in {where or 'an unknown storage'}; the report reads journal "
                         f"studies under the results folder")
    path = results_dir / where.removeprefix("journal:")
    if not path.is_file():
        raise StudyError(f"study {name!r}: its journal {path} is missing")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path) + ".lock")))
    return optuna.load_study(study_name=name, storage=storage)


def trials_table(study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"trial": t.number, "state": t.state.name, "run_id": t.user_attrs.get("run_id", ""),
               "reused": bool(t.user_attrs.get("reused")), "interrupted": bool(t.user_attrs.get("interrupted")),
               "pruned_at": max(t.intermediate_values) if t.state.name == "PRUNED" and t.intermediate_values else None}
        for i, v in enumerate(t.values or []):
            row[f"value_{i}"] = v
        row.update({f"param:{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _objectives(study, parent) -> list[tuple[str, str]]:
    text = parent.data.params.get("objectives", "")
    pairs = [part.strip().split(" ", 1) for part in text.split(",") if part.strip()]
    return [(metric, direction) for direction, metric in pairs] or [
        (f"objective {i}", d.name.lower()) for i, d in enumerate(study.directions)]


def _history_figure(table: pd.DataFrame, objectives, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4), squeeze=False)
    done = table[table["state"] == "COMPLETE"]
    for i, (metric, direction) in enumerate(objectives):
        ax = axes[0][i]
        ax.plot(done["trial"], done[f"value_{i}"], "o", label="completed trial")
        best = done[f"value_{i}"].cummax() if direction == "maximize" else done[f"value_{i}"].cummin()
        ax.step(done["trial"], best, where="post", label="best so far")
        pruned = table[table["state"] == "PRUNED"]
        for n in pruned["trial"]:
            ax.axvline(n, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("trial (dotted: pruned)")
        ax.set_ylabel(metric)
        ax.set_title(f"{direction} {metric}")
        ax.legend(fontsize="small")
    return figures._save(fig, path)  # noqa: SLF001 - one saving convention for every figure


def _params_figure(table: pd.DataFrame, objectives, params: list[str], log: set[str], path: Path) -> Path:
    done = table[table["state"] == "COMPLETE"]
    fig, axes = plt.subplots(len(objectives), len(params), figsize=(4.2 * len(params), 3.6 * len(objectives)),
                             squeeze=False)
    for i, (metric, _) in enumerate(objectives):
        for j, p in enumerate(params):
            ax = axes[i][j]
            x = done[f"param:{p}"]
            ax.plot(x, done[f"value_{i}"], "o")
            for _, row in done.iterrows():
                ax.annotate(str(int(row["trial"])), (row[f"param:{p}"], row[f"value_{i}"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            if p in log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
            ax.tick_params(axis="x", labelrotation=30)
            ax.set_xlabel(p)
            ax.set_ylabel(metric if j == 0 else "")
    fig.suptitle("Objective against each searched parameter (numbers: trials)")
    return figures._save(fig, path)  # noqa: SLF001


def _pareto_figure(points: pd.DataFrame, objectives, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 5))
    for front, part in points.groupby("pareto"):
        yerr = None
        if "lo" in part and part["lo"].notna().all():
            yerr = [part["value_0"] - part["lo"], part["hi"] - part["value_0"]]
        ax.errorbar(part["value_1"], part["value_0"], yerr=yerr, fmt="o" if front else "x", capsize=4,
                    label="Pareto set" if front else "dominated")
        for _, row in part.iterrows():
            ax.annotate(str(int(row["trial"])), (row["value_1"], row["value_0"]), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel(f"{objectives[1][0]} ({objectives[1][1]})")
    ax.set_ylabel(f"{objectives[0][0]} ({objectives[0][1]})")
    ax.set_title("Pareto front (bars: 95% CI over held-out pairs)")
    ax.legend(fontsize="small")
    return figures._save(fig, path)  # noqa: SLF001


def importances(study, n_objectives: int) -> tuple[list[dict[str, float]], str]:
    """Parameter importances per objective, and which evaluator gave them (or why none could)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < 3 or not done[0].params:
        return [], f"not computed: {len(done)} completed trial(s), at least 3 are needed"
    out = []
    for evaluator in (optuna.importance.FanovaImportanceEvaluator(seed=0),
                      optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)):
        try:
            out = [optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                           target=lambda t, i=i: t.values[i])
                   for i in range(n_objectives)]
            return out, type(evaluator).__name__
        except Exception as e:  # noqa: BLE001 - evaluators need variety and scikit-learn; say why not
            reason = f"{type(e).__name__}: {e}"
    return [], f"not computed ({reason})"


def _space(client, parent_run_id: str) -> dict:
    """The searched space as the study's parent run logged it ({key: {kind: values}})."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return yaml.safe_load(Path(client.download_artifacts(parent_run_id, "search/space.yaml", tmp)).read_text())
        except Exception:  # noqa: BLE001 - an older study without the artifact: plot on linear axes
            return {}


def _subset(study: Study, run_ids: list[str]) -> Study:
    keep = set(run_ids)
    return replace(study, runs=study.runs[study.runs["run_id"].isin(keep)],
                   metrics=study.metrics.loc[[r for r in study.metrics.index if r in keep]],
                   pairs=study.pairs[study.pairs["run_id"].isin(keep)],
                   history=study.history[study.history["run_id"].isin(keep)])


def build(target: str, results_dir: Path) -> Path:
    client, uri = R.client_for(results_dir)
    exp = client.get_experiment_by_name(target)
    parent = R.latest_search_run(client, exp.experiment_id) if exp is not None else None
    if parent is None:
        raise StudyError(f"no search named {target!r} in this store")
    study = open_study(parent, results_dir)
    out_dir = results_dir / target
    out_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    objectives = _objectives(study, parent)
    params = sorted({k.removeprefix("param:") for k in table.columns if k.startswith("param:")})
    space_text = parent.data.params.get("sampler", "?")
    space = _space(client, parent.info.run_id)
    log_params = {p for p, dist in space.items() if isinstance(dist, dict) and "log" in dist}
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    best = sorted(study.best_trials, key=lambda t: t.number) if counts.get("COMPLETE") else []
    logged = load_study(target, results_dir)
    groups = {g.runs.iloc[0]["run_id"]: g for g in report.build_groups(logged)}

    lines = [f"# {target}: what the search found", ""]
    lines += [f"Generated by `python -m harness report {target}` from the Optuna study `{target}` "
              f"({parent.data.tags.get(R.TAG_STORAGE)}) and its trials' MLflow runs (parent run "
              f"`{parent.info.run_id}`). Sampler {space_text}, pruner {parent.data.params.get('pruner', '?')}; "
              + "; ".join(f"{d} `{m}`" for m, d in objectives) + ".", ""]
    lines += ["Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
              + (f" ({int(table['reused'].sum())} answered from the store without training)"
                 if len(table) and table["reused"].any() else "")
              + (f"; {int(table['interrupted'].sum())} cut short by an interruption" if len(table)
                 and table["interrupted"].any() else "") + ".", ""]

    if best:
        title = "Best trial" if len(objectives) == 1 else f"Pareto set ({len(best)} trials)"
        lines += [f"## {title}", ""]
        rows = []
        for t in best:
            g = groups.get(t.user_attrs.get("run_id"))
            ci = fmt_ci(g.est) if g is not None else "n/a"
            rows.append([str(t.number), *[fmt(v) for v in t.values], *[_num(t.params.get(p)) for p in params], ci,
                         f"`{t.user_attrs.get('run_id', '')}`"])
        lines += report._table(["trial", *[m for m, _ in objectives], *params,  # noqa: SLF001
                                "held-out margin shift (95% CI)", "run"], rows)
        lines += ["", "The objective values are the trial's logged metrics; the interval is the paired bootstrap "
                      "over held-out pairs of that one trial (one training seed): a search picks the best of "
                      f"{counts.get('COMPLETE', 0)} noisy measurements, so the winner's value is optimistic. "
                      "Re-run the exported grid with other seeds before trusting a small difference.", ""]
        lines += ["Objectives: " + "; ".join(catalogue.describe(m) for m, _ in objectives) + ".", ""]
    else:
        lines += ["No trial completed yet.", ""]

    figs: list[tuple[str, str]] = []
    if counts.get("COMPLETE"):
        figs.append((_history_figure(table, objectives, out_dir / "search_history.png").name,
                     "Optimisation history: each completed trial and the best so far"))
        if params:
            figs.append((_params_figure(table, objectives, params, log_params, out_dir / "search_params.png").name,
                         "Each objective against each searched parameter"))
        if len(objectives) == 2:
            done = table[table["state"] == "COMPLETE"].copy()
            done["pareto"] = done["trial"].isin([t.number for t in best])
            if objectives[0][0] == "eval/margin_shift_mean":
                done["lo"] = [groups[r].est.lo if r in groups else math.nan for r in done["run_id"]]
                done["hi"] = [groups[r].est.hi if r in groups else math.nan for r in done["run_id"]]
            figs.append((_pareto_figure(done, objectives, out_dir / "search_pareto.png").name,
                         "Pareto front of the two objectives"))

    imp, how = importances(study, len(objectives))
    lines += ["## Parameter importances", ""]
    if imp:
        lines += [f"From Optuna's `{how}` over the completed trials (share of the objective's variance each "
                  "parameter explains; with this few trials, a rough ranking only):", ""]
        rows = [[p, *[f"{imp[i].get(p, 0.0):.2f}" for i in range(len(objectives))]] for p in params]
        lines += report._table(["parameter", *[m for m, _ in objectives]], rows) + [""]  # noqa: SLF001
    else:
        lines += [f"Importances {how}.", ""]

    lines += ["## All trials", ""]
    rows = []
    for _, r in table.iterrows():
        values = [fmt(r.get(f"value_{i}")) if pd.notna(r.get(f"value_{i}")) else "" for i in range(len(objectives))]
        note = "answered from the store" if r["reused"] else ("interrupted" if r["interrupted"] else "")
        if r["state"] == "PRUNED" and r["pruned_at"] is not None:
            note = f"pruned at step {int(r['pruned_at'])} (its value there)"
        rows.append([str(r["trial"]), r["state"], *values, *[_num(r.get(f"param:{p}")) for p in params], note])
    lines += report._table(["trial", "state", *[m for m, _ in objectives], *params, "note"], rows) + [""]  # noqa: SLF001

    if best:
        best_runs = [t.user_attrs.get("run_id") for t in best if t.user_attrs.get("run_id") in groups]
        if best_runs:
            sub = _subset(logged, best_runs)
            report.build(replace(sub, parent_run_id=parent.info.run_id), out_dir / "best", target=target)
            lines += ["## The best trial(s) in detail", "",
                      "The usual per-variant writeup (what moved, drift, comparisons) of the best trial(s): "
                      "[best/report.md](best/report.md).", ""]
    if figs:
        lines += ["## Figures", ""]
        for name, caption in figs:
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    webpage.write_html(path)  # figures inside, for MLflow's artifact viewer
    tracker = MlflowTracker(uri, parent.info.run_id)
    for f in sorted(out_dir.iterdir()):
        if f.suffix in (".md", ".html", ".png"):
            tracker.log_artifact(f, "report")
    if (out_dir / "best").is_dir():
        tracker.log_artifact(out_dir / "best", "report/best")
    return path


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.3g}" if isinstance(x, float) else str(x)
