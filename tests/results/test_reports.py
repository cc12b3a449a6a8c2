"""Reports, comparisons and the papers' figures, from rows."""

import json
import shutil
from pathlib import Path

import pytest

from bench.results import store
from bench.cli import main
from bench.results.compare import compare
from bench.results.figures import ROOT, render_all

TOY = "toy[d=64,batch=16]"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "toy-run"
    assert (
        main(
            [
                "run",
                "--tasks",
                TOY,
                "--estimators",
                "full,checkpoint,sdo,truncated[k=2]",
                "--targets",
                "latent,cond",
                "--steps",
                "4,8",
                "--iters",
                "2",
                "--rounds",
                "3",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_report_has_a_table_and_a_figure_per_task_and_target(toy_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(toy_run), "--out", str(out)]) == 0
    page = (out / "index.md").read_text()
    assert page.count("## toy[d=64] · target") == 2  # specs are canonical: batch=16 is the default
    for name in ("latent", "cond"):
        assert (out / f"toy_d_64_-{name}.png").stat().st_size > 20_000
    full_rows = [line for line in page.splitlines() if line.startswith("| full |")]
    assert len(full_rows) == 4 and all("| 1.00 |" in line for line in full_rows)  # × full of full
    assert "truncated[k=2] N=4 seed=0: skipped (" in page  # the latent skip, with its reason
    assert "(N·A)" in page and "rss_peak" in page
    assert "<table>" in (out / "index.html").read_text()


def test_a_cell_rerun_on_changed_code_counts_once(toy_run, tmp_path):
    """A folder rerun after a code change holds the old row under its old key too: the analysis
    and the report read the latest row of each cell, never the superseded one as another seed."""
    from bench.results import analysis

    folder = tmp_path / "rerun"
    shutil.copytree(toy_run, folder)
    rows = store.read_rows(folder)
    stale = {**rows[0], "key": "0" * 16, "estimator_code": "older", "grad_cos": -1.0}
    lines = (folder / store.ROWS).read_text()
    (folder / store.ROWS).write_text(json.dumps(stale) + "\n" + lines)  # read first: the older run's row
    frame, _ = analysis.load_run(folder)
    assert frame.attrs["superseded"] == 1 and len(frame) == len(store.latest_by_key(rows))
    means = analysis.cell_means(frame)
    cell = means[(means["estimator"] == rows[0]["estimator"]) & (means["target"] == rows[0]["target"])]
    assert (cell["seeds"] == 1).all() and not (frame["grad_cos"] == -1.0).any()
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    assert "1 row(s) of cells rerun since on changed code" in (tmp_path / "report" / "index.md").read_text()


def test_report_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a run folder" in err


def _rewrite(src: Path, dst: Path, change) -> None:
    dst.mkdir()
    shutil.copy(src / "run.json", dst / "run.json")
    for row in store.read_rows(src):
        change(row)
        store.append_row(dst / store.ROWS, row)


def test_compare_flags_changes_beyond_the_factor_and_the_spread(toy_run, tmp_path):
    def rounds(row, factors):
        row.pop("timing_suspect", None)  # the fixture's timing, flagged on a loaded machine, is not the subject
        if row.get("estimator") == "full" and row.get("status") == "ok":
            base = row["time_s"]
            row["time_rounds_s"] = [base * f for f in factors]
            row["time_s"] = base * factors[1]

    _rewrite(toy_run, tmp_path / "a", lambda row: rounds(row, [0.8, 1.0, 1.2]))  # IQR 0.9-1.1
    _rewrite(toy_run, tmp_path / "tight", lambda row: rounds(row, [1.9, 2.0, 2.1]))  # 2x, IQR 1.95-2.05
    _rewrite(toy_run, tmp_path / "noisy", lambda row: rounds(row, [0.1, 2.0, 4.0]))  # 2x, IQR 1.05-3
    table = compare(tmp_path / "a", tmp_path / "tight")
    flagged = table[table["flags"] != ""]
    assert set(flagged["estimator"]) == {"full"} and (flagged["flags"] == "time slower").all()
    assert table.loc[table["estimator"] == "full", "time_ratio"].round(6).eq(2).all()
    assert (compare(tmp_path / "a", tmp_path / "noisy")["flags"] == "").all()  # the spread explains it
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "tight"), "--strict"]) == 1
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "noisy"), "--strict"]) == 0


def test_figures_redraw_from_the_committed_reference_results(tmp_path):
    results = render_all(out=tmp_path)
    assert [r["name"] for r in results] == [
        "1_sdo_headline",
        "2_adjoint_memory",
        "3_draft_k",
        "4_tradeoff",
        "5_frontier",
        "6_shortft",
        "7_dipgo",
        "8_frontier_2026",
        "9_methods_2026_compute",
        "10_dipgo_transformer",
    ]
    for r in results:
        for suffix in ("png", "svg"):
            assert (tmp_path / f"{r['name']}.{suffix}").stat().st_size > 10_000
        assert r["claim"] and any(ch.isdigit() for ch in r["measured"])
    index = (tmp_path / "README.md").read_text()
    assert index.count("**Claim.**") == 10 and "digits-scaling" in index
    assert "## On the models the papers were written for" in index and "reports/figures/papers" in index
    assert all(f"| `{name}`" in index for name in ("sdo_sd15", "adjointdpm_sd15", "dipgo_sd15", "shortft_sdxl"))
    frontier = next(r for r in results if r["name"] == "5_frontier")["measured"]
    assert "In the region (cosine ≥ 0.99 at ≤ 12.5 VJPs" in frontier and "coarse-adjoint: cosine" in frontier
    shortft = next(r for r in results if r["name"] == "6_shortft")["measured"]
    assert "shortcut-model -0.0005 after" in shortft and "95 % of the best gain" in shortft
    frontier_2026 = next(r for r in results if r["name"] == "8_frontier_2026")["measured"]
    assert "In the region (cosine ≥ 0.9 at ≤ 2 VJPs, mean over 2 seeds): none." in frontier_2026
    assert "direct-align: cosine" in frontier_2026 and "flowbp[k=2]: cosine" in frontier_2026
    compute = next(r for r in results if r["name"] == "9_methods_2026_compute")["measured"]
    assert compute.count("gains after the budget on the problem's samples, and the class-matched KID") == 3
    dipgo = next(r for r in results if r["name"] == "7_dipgo")["measured"]
    assert "within 2 points: full (keep 0.6)" in dipgo and "searched 3.19× (full keep 0.3)" in dipgo
    for spec in (ROOT / "reports" / "figures").glob("*.toml"):
        source = ROOT / __import__("tomllib").loads(spec.read_text())["source"]
        assert json.loads((source / "run.json").read_text())["device"]  # the device is recorded


def test_a_bad_figure_spec_is_one_line(tmp_path, capsys):
    (tmp_path / "broken.toml").write_text('title = "x"\nkind = "pie"\nsource = "results"\nclaim = "c"\n')
    assert main(["figures", "--specs", str(tmp_path)]) == 2
    assert "unknown kind 'pie'; valid: cost_and_reward" in capsys.readouterr().err


def test_every_registered_estimator_has_a_colour_and_marker_of_its_own():
    """Styles come from the estimators' own classes (plot_style): no two registered estimators share
    a colour and a marker, and one without a declared style gets a pair no other has."""
    from bench.results import plots
    from bench.registry import ESTIMATORS

    styles = {name: plots.family_style(name) for name in ESTIMATORS.listed()}
    assert len(set(styles.values())) == len(styles), styles
    assert all(ESTIMATORS.get(name).plot_style for name in ("full", "adjoint", "coarse-adjoint", "shortcut-model"))
    assert plots.family_style("not-registered") not in set(styles.values())
