"""What a user sees in the MLflow UI, checked from the store and in a real browser.

A tiny two-variant grid is trained, written up and then moved to another folder (as a user would move or copy
`results/`). The store-level tests check what every run carries (the `summary/` headline at step 0, equal to the
logged metrics and to the report's CI; the verdict; the description; the per-pair table; the parent's table;
`report.html` with its figures inside) and that the moved store is re-anchored. The browser test starts
`harness ui` on that moved store and drives Debian's chromium through Playwright (never a downloaded browser):
the variants with their shift and CI columns, the compare page's differing params and metrics, the report with
an image rendered, and the whole server tree gone after SIGTERM.

    python -m pytest tests/test_ui.py                                   # ~3 min on the 2-core dev machine
    HARNESS_UI_SCREENSHOTS=docs/ui python -m pytest tests/test_ui.py -m browser   # regenerate docs/ui.md's

Screenshots go to `$HARNESS_TEST_ARTIFACTS/ui` (else pytest's tmp folder) and, when HARNESS_UI_SCREENSHOTS
is set, to that folder too. Without playwright or chromium the browser test is skipped, except where
CI=true: there it fails.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis import stats
from harness.cli import main
from harness.core import runs as R
from harness.core.metrics import SUMMARY_KEYS, SUMMARY_OF, headline_round

ROOT = Path(__file__).resolve().parent.parent
GRID = """
name: tiny_ui
defaults:
  method: dpo_lora
  base_model: tiny-random-llama
  data: {max_length: 128}
  train: {max_steps: 2, batch_size: 4, learning_rate: 1e-3}
  lora: {rank: 4, alpha: 8}
  eval: {probe_length: 4}
variants:
  - {name: small, data: {size: 4}, dpo: {beta: 0.1}}
  - {name: large, data: {size: 8}, dpo: {beta: 0.5}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The grid run and reported in `built/`, then moved to `moved/` (nothing is left at the old path)."""
    root = tmp_path_factory.mktemp("ui")
    grid = root / "grid.yaml"
    grid.write_text(GRID)
    built, moved = root / "built", root / "moved"
    assert main(["run", str(grid), "--results", str(built), "--jobs", "2"]) == 0
    assert main(["report", "tiny_ui", "--results", str(built)]) == 0
    shutil.move(built, moved)
    con = sqlite3.connect(moved / "mlflow.db")
    recorded = [row[0] for row in con.execute("SELECT artifact_uri FROM runs")]
    con.close()
    return {"results": moved, "old": built, "recorded": recorded}


def _runs(results: Path):
    client, _ = R.client_for(results)  # re-anchors the moved store (idempotent)
    exp = client.get_experiment_by_name("tiny_ui")
    variants = R.search(client, exp.experiment_id, R.Q_VARIANTS_FINISHED)
    parent = R.search(client, exp.experiment_id, R.Q_GRIDS)
    return client, exp, sorted(variants, key=lambda r: r.info.run_name), parent[0]


def _pairs(client, run_id: str, tmp: Path) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, R.PAIRS_ARTIFACT, str(tmp)))


def test_a_moved_store_is_reanchored_and_its_artifacts_read(store, tmp_path):
    assert store["recorded"] and all(str(store["old"]) in uri for uri in store["recorded"])  # as MLflow wrote them
    client, exp, variants, parent = _runs(store["results"])
    here = (store["results"] / "artifacts").resolve().as_uri()
    assert exp.artifact_location == f"{here}/tiny_ui"
    assert all(r.info.artifact_uri.startswith(here) for r in [*variants, parent])
    path = client.download_artifacts(variants[0].info.run_id, R.VARIANT_ARTIFACT, str(tmp_path))
    assert "dpo_lora" in Path(path).read_text()
    assert R.reanchor(f"sqlite:///{store['results'] / 'mlflow.db'}") is None  # nothing left to do


def test_every_variant_carries_its_headline_at_step_0(store, tmp_path):
    client, _, variants, _ = _runs(store["results"])
    report = (store["results"] / "tiny_ui" / "report.md").read_text()
    assert [r.data.params["name"] for r in variants] == ["large", "small"]
    for run in variants:
        m = run.data.metrics
        for key in SUMMARY_KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert [h.step for h in history] == [0], key  # one point at step 0: a bar in the Chart tab
        for key, source in SUMMARY_OF.items():
            assert m[key] == headline_round(m[source]), key
        rows = _pairs(client, run.info.run_id, tmp_path / run.info.run_id)
        est = stats.bootstrap_mean(rows[rows["split"] == "eval"]["margin_shift"].to_numpy())
        assert (m["summary/shift_lo"], m["summary/shift_hi"]) == (headline_round(est.lo), headline_round(est.hi))
        assert est.lo < m["summary/shift"] < est.hi
        assert stats.fmt_ci(est) in report  # the interval the report prints for this one-seed variant
        assert run.data.tags[R.TAG_VERDICT] == est.verdict()
        note = run.data.tags[R.NOTE_TAG]
        assert note.startswith(f"**Held-out margin shift {stats.fmt_ci(est)} nats — {est.verdict()}**")
        assert "DPO (beta" in note and f"{run.data.params['data.size']} training rows" in note
        table = client.download_artifacts(run.info.run_id, R.PAIRS_TABLE_ARTIFACT, str(tmp_path / "t"))
        frame = pd.read_json(table, orient="split")
        assert list(frame.columns[:2]) == ["pair", "margin_shift"] and len(frame) == 32
        assert frame["margin_shift"].tolist() == pytest.approx(rows[rows["split"] == "eval"]["margin_shift"].tolist())


def test_the_parent_run_describes_its_variants_and_holds_the_report_page(store, tmp_path):
    client, exp, variants, parent = _runs(store["results"])
    note = parent.data.tags[R.NOTE_TAG]
    assert "2 variant(s) — 2 finished" in note
    for run in variants:
        m = run.data.metrics
        assert f"| {run.info.run_name} | {stats.fmt(m['summary/shift'])} [{stats.fmt(m['summary/shift_lo'])}, " \
               f"{stats.fmt(m['summary/shift_hi'])}] | {run.data.tags[R.TAG_VERDICT]} |" in note
    assert exp.tags[R.EXPERIMENT_KIND_TAG] == R.EXPERIMENT_KIND  # opens as "Model training", not GenAI traces
    view = exp.tags["mlflow.sharedViewState.harness-variants"]
    assert "summary/shift_lo" in view and "params.`data.size`" in view and "params.`dpo.beta`" in view
    assert "params.`lora.rank`" not in view  # the same in both variants: not a column of the view
    page = Path(client.download_artifacts(parent.info.run_id, "report/report.html", str(tmp_path)))
    html = page.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (store["results"] / "tiny_ui" / "report.md").read_text())
    assert len(figures) >= 3
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == len(figures)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(
        (store["results"] / "tiny_ui" / f).read_bytes() for f in figures)
    assert ".png)" not in html and "<script" not in html


def test_ui_refuses_a_remote_host_without_allow_remote(tmp_path, capsys):
    assert main(["ui", "--host", "0.0.0.0", "--port", str(_free_port()), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 would let other machines read and change every run" in err and "--allow-remote" in err
    assert not (tmp_path / "r").exists()  # refused before anything was created


def test_ui_with_allow_remote_warns_before_anything_else(tmp_path, capsys):
    with socket.socket() as s:  # a taken port ends it right after the warning, before any server starts
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--host", "0.0.0.0", "--allow-remote", "--port", str(port), "--results",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"warning: --host 0.0.0.0 --allow-remote: anyone who can reach this machine on port {port}" in err
    assert "the port is already in use" in err


def test_ui_names_the_grids_there_are_for_an_unknown_one(store, capsys):
    assert main(["ui", "no_such_grid", "--port", str(_free_port()), "--results", str(store["results"])]) == 2
    err = capsys.readouterr().err
    assert "no grid or search named 'no_such_grid'" in err and "here: tiny_ui" in err


# ---------------------------------------------------------------- in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str | None:
    for candidate in (os.environ.get("HARNESS_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _browser_or_skip() -> str:
    """Debian's chromium and the playwright package, or skip (fail where CI=true: CI installs both)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[ui-test]')")
    chromium = _chromium()
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run installs both")
        pytest.skip(message)
    return chromium


def _shots_dirs(tmp_path: Path) -> list[Path]:
    base = os.environ.get("HARNESS_TEST_ARTIFACTS")
    dirs = [Path(base) / "ui" if base else tmp_path / "screenshots"]
    if os.environ.get("HARNESS_UI_SCREENSHOTS"):
        dirs.append(Path(os.environ["HARNESS_UI_SCREENSHOTS"]))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def _read_links(proc: subprocess.Popen, timeout: float) -> dict[str, str]:
    """The URLs `harness ui` prints once its server answers."""
    links: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            assert proc.poll() is None, f"harness ui exited with {proc.returncode}"
            continue
        for url in re.findall(r"http://\S+", line):
            key = ("view" if "viewStateShareKey" in url else "compare" if "compare-runs" in url else
                   "report" if url.split("?")[0].endswith("report.html") else "parent" if "/runs/" in url else "base")
            links[key] = url
        if {"view", "compare", "parent", "report"} <= links.keys():
            return links
    raise AssertionError(f"harness ui printed only {links} in {timeout} s")


@pytest.mark.browser
def test_the_ui_shows_the_comparison_in_a_real_browser(store, tmp_path):
    chromium = _browser_or_skip()
    import psutil
    from playwright.sync_api import sync_playwright

    client, exp, variants, parent = _runs(store["results"])
    shots = _shots_dirs(tmp_path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "ui", "tiny_ui", "--port", str(port), "--results",
                             str(store["results"])], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    tree: list = []
    try:
        links = _read_links(proc, timeout=240)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 2  # harness ui and the server it started

        def shoot(page, name: str, height: int | None = None) -> None:
            clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height} if height else None
            for d in shots:
                page.screenshot(path=str(d / name), clip=clip)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1680, "height": 900})
            drive(page, links, variants, shoot)
            browser.close()

        proc.send_signal(signal.SIGTERM)  # to its PID alone, as `kill <pid>` does
        assert proc.wait(timeout=60) == 130
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        with socket.socket() as s:  # nothing listens on the port any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        for p in tree:  # never leave a server behind, even when the test fails
            try:
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()


def drive(page, links: dict[str, str], variants: list, shoot) -> None:
    """What a user must see, page by page, asserted and photographed (`shoot(page, name)`)."""
    from playwright.sync_api import expect

    page.set_default_timeout(90_000)  # the server can take a minute to answer on a loaded machine
    expect.set_options(timeout=90_000)

    # the experiment page, as printed: variants only, flat, what differs and the headline as columns
    page.goto(links["view"], timeout=120_000)
    for run in variants:
        expect(page.get_by_text(run.info.run_name, exact=True)).to_be_visible()
    _tidy(page)
    for header in ("data.size", "dpo.beta", "summary/shift", "summary/shift_lo", "summary/shift_hi",
                   "harness.verdict"):
        expect(page.locator(f"[data-testid='sort-header-{header}']")).to_be_visible()
    for run in variants:  # the row's unpinned cells (MLflow's grid keys its rows by run id)
        row = page.locator(f".ag-center-cols-container [row-id='{run.info.run_id}']")
        for key in ("summary/shift", "summary/shift_lo", "summary/shift_hi"):
            expect(row).to_contain_text(_shown(run.data.metrics[key]))
        expect(row).to_contain_text(run.data.tags[R.TAG_VERDICT])
    shoot(page, "runs.png", height=330)

    # the Chart tab of the same view: the headline as bars, ahead of the step curves
    page.locator("label", has=page.locator("input[value=CHART]")).click()
    expect(page.get_by_text("summary/shift", exact=True).first).to_be_visible()
    shoot(page, "charts.png")

    # the Evaluation view of the same view: the held-out pairs' margin shift, one column per variant
    page.locator("label", has=page.locator("input[value=ARTIFACT]")).click()
    expect(page.get_by_text(R.PAIRS_TABLE_ARTIFACT, exact=True).first).to_be_visible()
    expect(page.get_by_text("margin_shift", exact=True).first).to_be_visible()  # compared, grouped by pair
    shoot(page, "pairs.png")

    # the compare page of the latest invocation, showing only what differs
    page.goto(links["compare"], timeout=120_000)
    expect(page.get_by_text(f"Comparing {len(variants)} Runs")).to_be_visible()
    _tidy(page)
    for switch in page.get_by_text("Show diff only").all()[:2]:  # parameters, metrics
        switch.click()
    params = page.locator("table", has=page.get_by_text("data.size", exact=True)).first
    expect(params).to_contain_text("dpo.beta")
    expect(params).not_to_contain_text("lora.rank")  # the same in both: hidden
    expect(page.get_by_role("link", name="eval/margin_shift_mean", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="eval/pairs", exact=True)).to_have_count(0)  # 32 in both: hidden
    page.get_by_text("Run details", exact=True).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    shoot(page, "compare.png")

    # the invocation's run: its description is the table of its variants
    page.goto(links["parent"], timeout=120_000)
    expect(page.get_by_text(f"{len(variants)} variant(s) — {len(variants)} finished", exact=False)).to_be_visible()
    for run in variants:
        expect(page.locator("table", has=page.get_by_text(run.info.run_name, exact=True)).first).to_contain_text(
            run.data.tags[R.TAG_VERDICT])

    # the report, figures rendered inside MLflow's artifact viewer
    page.goto(links["report"], timeout=120_000)
    frame = page.frame_locator("iframe").first
    expect(frame.locator("h1")).to_contain_text("what moved")
    _tidy(page)
    image = frame.locator("img").first
    image.scroll_into_view_if_needed()
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete ? img.naturalWidth : 0") > 100, "the first figure did not render"
    shoot(page, "report.png")


def _shown(value: float) -> str:
    """How MLflow's runs table writes a metric value: JavaScript's shortest round-trip digits, in plain notation
    from 1e-6 up (0.00003914), in exponent notation below (6.012e-7)."""
    from decimal import Decimal

    value = float(value)
    if value != 0 and abs(value) < 1e-6:
        mantissa, exponent = f"{value:e}".split("e")
        digits = repr(float(mantissa)).rstrip("0").rstrip(".")
        return f"{digits}e{int(exponent)}"
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _tidy(page) -> None:
    """Close what MLflow opens over the page on a first visit (its assistant panel, the shared-view banner)."""
    for label in ("Close", "Hide banner"):
        button = page.get_by_label(label, exact=True)
        if button.count() and button.first.is_visible():
            button.first.click()
