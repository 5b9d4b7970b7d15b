import json

from safegene.cli import main


def test_data_list_and_show(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "advbench" in out and "harmful-pairs" in out and "arithmetic" in out
    assert main(["data", "show", "arithmetic", "-n", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("arithmetic: 2000 records") and len(lines) == 3


def test_errors_are_one_clear_line(capsys, tmp_path):
    assert main(["degrade", "--model", "no-such-model", "--output", str(tmp_path / "o"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safegene: error: model 'no-such-model' not found") and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["finetune", "--poison-ratio", "1.5"]) == 2
    assert "poison_ratio must be in [0, 1)" in capsys.readouterr().err


def test_finetune_via_cli_writes_card(tiny_qwen, tmp_path, capsys):
    out = tmp_path / "t"
    rc = main(["finetune", "--model", str(tiny_qwen), "--task", "arithmetic", "--n-examples", "8", "--max-steps", "2",
               "--batch-size", "2", "--output", str(out), "--save", "adapter", "--json"])
    assert rc == 0
    card = json.loads((out / "safegene_run.json").read_text())
    assert json.loads(capsys.readouterr().out)["output"] == str(out.resolve())
    assert card["kind"] == "finetune" and card["training"]["steps"] == 2 and card["config"]["task"] == "arithmetic"
