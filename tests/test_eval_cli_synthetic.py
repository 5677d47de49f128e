"""``spattn eval mqar|listops --lengths`` (with learned attention) and ``spattn eval ablate`` on the synthetic tasks."""

import json
import re

from typer.testing import CliRunner

from spattn.cli.main import app

runner = CliRunner()


def test_mqar_at_several_lengths_with_learned_attention(tmp_path):
    out = tmp_path / "mqar"
    result = runner.invoke(app, ["eval", "mqar", "--size", "tiny", "--steps", "3", "--lengths", "16,24",
                                 "--learned-blocks", "1", "--learned-window", "8",
                                 "--seeds", "1", "--no-figures", "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["lengths"] == [16, 24] and "plans" not in record  # one training per length
    for length in (16, 24):
        block = record["by_length"][str(length)]
        assert block["config"]["task_options"]["seq_len"] == length
        assert list(block["plans"]) == ["dense", "learned=1,window=8"]
        learned = block["plans"]["learned=1,window=8"]
        assert learned["runs"][0]["plan"]["learned"]["blocks"] == 1
        assert learned["versus_dense"]["winner"] in ("a", "b", "tie")
    bad = runner.invoke(app, ["eval", "listops", "--lengths", "x", "--output", str(out)])
    assert bad.exit_code != 0 and "lengths" in bad.output


def test_ablate_covers_the_synthetic_tasks(tmp_path):
    out = tmp_path / "ablate"
    result = runner.invoke(app, ["eval", "ablate", "--task", "mqar", "--factor", "window", "--values", "2,16",
                                 "--window", "4", "--sinks", "0", "--block-size", "8", "--steps", "3", "--seeds", "2",
                                 "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["ablated_task"] == "mqar" and record["seeds"] == [0, 1]
    rows = record["ablation"]["rows"]
    assert [r["value"] for r in rows] == [2, 16]
    assert all(r["score"]["n"] == 2 * record["config"]["test_examples"] for r in rows)  # pooled over both seeds
    assert record["dense"]["n"] == 2 * record["config"]["test_examples"]
    assert (out / "ablation.png").stat().st_size > 1000
    bad = runner.invoke(app, ["eval", "ablate", "--task", "mqar", "--factor", "window", "--values", "2",
                              "--lengths", "16,24", "--output", str(out), "--device", "cpu"])
    assert bad.exit_code != 0 and "one length" in re.sub(r"[\s│╭╮╰╯─]+", " ", bad.output)
