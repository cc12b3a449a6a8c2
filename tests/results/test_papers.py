"""The papers' sweeps on the models they were written for (results/reference/sweeps/sd15-*.toml,
sdxl-shortft.toml), run here as a smoke test: each file with its tasks swapped for the tiny random
pipelines and a few steps gives ok rows, and its figure spec (reports/figures/papers) draws them.
The numbers mean nothing; what is tested is that the sweep, its estimators and its figure fit
together, so that a GPU run needs only the user's folders."""

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.results import figures

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "results" / "reference" / "sweeps"
PAPERS = ROOT / "reports" / "figures" / "papers"

CASES = {  # figure -> (sweep, the tiny tasks, steps, what the figure's options need here)
    "sdo_sd15": ("sd15-sdo", ["sd[reward=aesthetic,batch=1]"], "3", {"steps": 3, "targets": ["latent"]}),
    "adjointdpm_sd15": ("sd15-adjointdpm", ["sd[reward=clip,batch=1]"], "2,4", {}),
    "dipgo_sd15": ("sd15-dipgo", ["sd[batch=1,gate_keep=0.3]", "sd[batch=1,gate_keep=0.6]"], "3", {"steps": 3}),
}


@pytest.fixture(scope="module")
def sdxl_student(tmp_path_factory, pipeline_cache):
    """A 4-step student of the tiny SDXL pipeline distilled by the repo (briefly: a smoke test)."""
    from tasks.shortcut.__main__ import main as distil

    folder = tmp_path_factory.mktemp("sdxl-student")
    argv = ["--task", "sdxl[batch=1]", "--steps", "4", "--segment", "2", "--train-steps", "30"]
    assert distil([*argv, "--trajectories", "8", "--threads", "1", "--out", str(folder)]) == 0
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES, "shortft_sdxl"])
def test_each_papers_sweep_runs_on_the_tiny_pipeline_and_draws_its_figure(name, tmp_path, pipeline_cache, request):
    if name == "shortft_sdxl":  # N = 12: truncated[k=12] runs; x_0 is compared, any error passes here
        student = request.getfixturevalue("sdxl_student")
        sweep, tasks, steps = "sdxl-shortft", [f"sdxl[batch=1,student={student},student_bound=100]"], "12"
        options = {"steps": 12, "budget": 1.0}
    else:
        sweep, tasks, steps, options = CASES[name]
    out = tmp_path / "rows"
    argv = ["run", "--config", str(SWEEPS / f"{sweep}.toml"), "--tasks", ",".join(tasks), "--steps", steps]
    argv += ["--device", "cpu", "--seeds", "0", "--iters", "1", "--rounds", "1", "--warmup", "0", "--timeout", "600"]
    argv += ["--budget", "1"] if name == "shortft_sdxl" else []  # its figure: equal compute
    argv += ["--no-memory"] if name in ("shortft_sdxl", "dipgo_sd15") else []  # their figures draw no memory
    argv += ["--targets", "latent"] if name == "sdo_sd15" else []  # its weights target: figure 1 on digits
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    failed = [(r["estimator"], r["target"], r.get("reason")) for r in rows if r["status"] not in ("ok", "skipped")]
    assert not failed and sum(r["status"] == "ok" for r in rows) >= 2, failed  # skips: by design (DRaFT's x_N)
    if name == "shortft_sdxl":
        (row,) = [r for r in rows if r["estimator"] == "shortcut-model"]
        assert row["status"] == "ok" and row["student_traj_points"] >= 1 and row["student_traj_err"] >= 0
    path = PAPERS / f"{name}.toml"
    spec = figures.load_spec(path)
    spec = {**spec, "source": str(out), "options": {**spec.get("options", {}), **options}}
    (tmp_path / "figure").mkdir()
    result = figures.render(path, tmp_path / "figure", ("png",), spec)
    assert (tmp_path / "figure" / f"{name}.png").stat().st_size > 10_000 and result["measured"]


def test_every_paper_figure_has_its_sweep_and_says_what_runs_here():
    specs = {path.stem: figures.load_spec(path) for path in PAPERS.glob("*.toml")}
    assert set(specs) == {"sdo_sd15", "adjointdpm_sd15", "dipgo_sd15", "shortft_sdxl"}
    for spec in specs.values():
        assert (ROOT / spec["sweep"]).is_file() and spec["model"] and spec["here"]
        assert "cuda" in (ROOT / spec["sweep"]).read_text() and "--config" in (ROOT / spec["sweep"]).read_text()
