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


def test_safegene_pipeline_via_cli(tiny_qwen, tmp_path, capsys):
    from test_adapter import make_degraded

    d = tmp_path / "D"
    make_degraded(tiny_qwen, d, layers=(0, 1))
    ad, sel, cal, merged = (tmp_path / n for n in ("ad", "sel", "cal", "merged"))
    assert main(["extract", "--aligned", str(tiny_qwen), "--degraded", str(d), "-o", str(ad), "--rank", "2"]) == 0
    assert main(["select", str(ad), "-o", str(sel), "--model", str(d), "--top-k", "1", "--set", "n_harmful=4",
                 "--set", "n_benign=4"]) == 0
    assert main(["recalibrate", str(sel), "--task-model", str(d), "-o", str(cal), "--steps", "2", "--n-harmful", "4",
                 "--n-task", "4"]) == 0
    assert main(["apply", str(cal), "--model", str(d), "-o", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "extract: wrote" in out and "select: wrote" in out and "α:" in out and "apply: wrote" in out
    card = json.loads((cal / "safegene.json").read_text())
    assert len(card["selected_layers"]) == 1 and "recalibration" in card and "selection" in card
    assert (sel / "layer_scores.png").is_file() and (merged / "model.safetensors").is_file()
    # the merged model is an input now: applying onto it again into itself is refused
    assert main(["apply", str(cal), "--model", str(merged), "-o", str(merged)]) == 2
    assert "overlaps the input" in capsys.readouterr().err
