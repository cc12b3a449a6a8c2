"""The row's fields are declared once (bench/results/fields.py): the table of docs/run-folders.md is
rendered from the declaration, and every key a real sweep writes is declared."""

import json
import re
from pathlib import Path

from bench.results import fields
from bench.run.runner import SweepSpec, run_sweep

PAGE = Path(__file__).resolve().parents[2] / "docs" / "run-folders.md"


def test_the_docs_field_table_is_the_declaration():
    text = PAGE.read_text()
    table = re.search(r"<!-- fields:start -->\n(.*?)\n<!-- fields:end -->", text, re.S)
    assert table, "docs/run-folders.md lacks the fields:start/fields:end markers"
    assert table.group(1) == fields.readme_table(), (
        "docs/run-folders.md's field table is stale: run python -m bench.cli.docs"
    )


def test_every_key_of_real_rows_is_declared(tmp_path):
    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]", "toy[d=2,batch=2,reward=inside,eta=1.0]"],
        estimators=["full", "sdo", "edict", "score-function"],
        targets=["latent", "cond"],
        steps=[3],
        iters=1,
        rounds=1,
        memory="inprocess",
    )
    run_sweep(spec, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {row["status"] for row in rows} >= {"ok", "skipped"}
    undeclared = {key for row in rows for key in row if fields.declared(key) is None}
    assert not undeclared


def test_patterns_and_numeric_columns():
    assert fields.declared("eval_kid_init").name == "eval_*_init"
    assert fields.declared("eval_fid").name == "eval_*"
    assert fields.declared("eval_fid_floor").name == "eval_*_floor"
    assert fields.declared("no_such_field") is None
    numeric = fields.numeric_columns()
    assert "time_s" in numeric and "status" not in numeric and "time_rounds_s" not in numeric
