"""The plug-in author's surface: one public module (bench.api), and `bench list` names the
included file an estimator came from."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_one_public_module_and_list_names_the_included_file(tmp_path, capsys, monkeypatch):
    import bench.api

    for name in (
        "Estimator",
        "Estimate",
        "Cost",
        "Option",
        "SpecError",
        "SkipCell",
        "Problem",
        "Chain",
        "Schedule",
        "noise_for",
        "run_masked_chain",
        "torch_generator",
        "backprop",
        "register_estimator",
        "Task",
        "register_task",
    ):
        assert name in bench.api.__all__ and hasattr(bench.api, name)
    example = ROOT / "examples" / "checkpointed_draft.py"
    assert "from bench.api import" in example.read_text()
    result = subprocess.run(
        [sys.executable, "-m", "bench", "list", "draft-ckpt", "--include", str(example)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.returncode == 0, result.stderr
    assert f"{example}:CheckpointedDraft" in result.stdout
