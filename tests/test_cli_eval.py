"""``spattn eval`` end to end on tiny settings: JSON with machine, versions, commit and command; PNG figures."""

import json

import pytest
from typer.testing import CliRunner

from spattn.cli.main import app

runner = CliRunner()


def test_mqar_command_writes_results_and_figure(tmp_path):
    out = tmp_path / "mqar"
    result = runner.invoke(app, ["eval", "mqar", "--size", "tiny", "--steps", "4", "--plan", "window=2",
                                 "--seeds", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "mqar" and record["seeds"] == [0, 1]
    assert {"machine", "versions", "commit", "command"} <= set(record)
    assert record["machine"]["cpu_count"] >= 1 and record["versions"]["torch"]
    assert set(record["plans"]) == {"dense", "window=2"}
    window = record["plans"]["window=2"]
    assert window["accuracy"]["n"] == 2 and window["versus_dense"]["winner"] in ("a", "b", "tie")
    assert (out / "accuracy.png").stat().st_size > 1000


def test_passkey_command_on_a_tiny_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from spattn.integrations.models import smollm2_checkpoint

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_checkpoint()))
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=1024)
    folder = tmp_path / "tiny-model"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "haystack.txt"
    text.write_text("\n\n".join(f"A short paragraph number {i} about nothing in particular." for i in range(300)))
    out = tmp_path / "passkey"
    result = runner.invoke(app, ["eval", "passkey", "--model", str(folder), "--text", str(text), "--lengths", "200,300",
                                 "--depths", "0.1,0.9", "--seeds", "1", "--plan", "sinks=4,window=16",
                                 "--distractors", "1", "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["samples"] == 4 and record["options"]["distractors"] == 1
    plans = record["result"]["plans"]
    assert list(plans) == ["dense", "sinks=4,window=16"]
    assert {(c["length"], c["depth"]) for c in plans["dense"]["cells"]} == {(200, 0.1), (200, 0.9), (300, 0.1),
                                                                            (300, 0.9)}
    assert (out / "heatmap.png").stat().st_size > 1000
    bad = runner.invoke(app, ["eval", "passkey", "--model", str(folder), "--depths", "1.5", "--output", str(out)])
    assert bad.exit_code != 0 and "depths" in bad.output


def test_mqar_filler_prefix_reaches_the_generator(tmp_path):
    out = tmp_path / "mqar-prefix"
    result = runner.invoke(app, ["eval", "mqar", "--size", "tiny", "--steps", "2", "--plan", "sinks=6,window=4",
                                 "--seeds", "1", "--prefix-length", "6", "--no-figures", "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["task_options"]["prefix_length"] == 6
    bad = runner.invoke(app, ["eval", "mqar", "--size", "tiny", "--steps", "2", "--prefix-length", "3",
                              "--output", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "prefix_length" in bad.output
