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
    # every command that wrote a folder left a run card: effective config, hashed inputs, versions, time, memory
    for folder, kind, inputs in ((ad, "extract", {"aligned", "degraded"}), (sel, "select", {"adapter", "model"}),
                                 (cal, "recalibrate", {"adapter", "task_model"}), (merged, "apply", {"adapter", "model"})):
        run = json.loads((folder / "safegene_run.json").read_text())
        assert run["kind"] == kind and set(run["inputs"]) == inputs, (folder, run["inputs"])
        assert all(len(i["hash"]) == 64 for i in run["inputs"].values())
        assert run["timings"]["total_s"] > 0 and run["peak_rss_mb"] > 0 and run["versions"]["torch"]
    assert json.loads((sel / "safegene_run.json").read_text())["config"]["top_k"] == 1
    # a folder hashes the same after its own card was written into it: recalibrate recorded `sel` as it is now
    from safegene.runcard import input_digest

    assert json.loads((cal / "safegene_run.json").read_text())["inputs"]["adapter"]["hash"] == input_digest(sel)["hash"]
    # the merged model is an input now: applying onto it again into itself is refused
    assert main(["apply", str(cal), "--model", str(merged), "-o", str(merged)]) == 2
    assert "overlaps the input" in capsys.readouterr().err


def test_every_command_is_generated_from_its_config():
    """Each config field is a flag with the field's help text; --config, --set and --run-card are everywhere."""
    import dataclasses

    from safegene.cli import COMMANDS, _flags, build_parser, command_parsers

    subparsers = command_parsers(build_parser())
    assert set(subparsers) == {cmd.name for cmd in COMMANDS}
    for cmd in COMMANDS:
        sub = subparsers[cmd.name]
        options = {s: a for a in sub._actions for s in a.option_strings}
        assert {"--config", "--set", "--run-card"} <= set(options), cmd.name
        for fl in _flags(cmd.config()):
            action = options["--" + fl.dest.replace("_", "-")]
            assert fl.field.metadata["help"] and action.help.startswith(fl.field.metadata["help"]), (cmd.name, fl.dest)
        assert dataclasses.is_dataclass(cmd.config())


def test_config_file_then_flags_then_set(tmp_path, capsys):
    y = tmp_path / "show.yaml"
    y.write_text("action: show\nname: arithmetic\nn: 4\nsplit: test\n")
    card = tmp_path / "card.json"
    assert main(["data", "--config", str(y), "-n", "1", "--run-card", str(card)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("arithmetic: ") and len(lines) == 2  # the flag beat the file's n: 4
    recorded = json.loads(card.read_text())
    assert recorded["kind"] == "data" and recorded["config"] == {"action": "show", "name": "arithmetic", "n": 1,
                                                                 "split": "test"}
    assert main(["data", "show", "arithmetic", "--set", "n=2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["data", "show", "arithmetic", "--set", "n=two"]) == 2
    assert "DataConfig.n: expected int, got 'two'" in capsys.readouterr().err
    assert main(["select", "-o", str(tmp_path / "s")]) == 2
    assert "select needs adapter" in capsys.readouterr().err


def test_unexpected_errors_are_one_line(monkeypatch, capsys):
    import safegene.cli as cli

    def boom(cfg, flags):
        raise ValueError("something odd")
    monkeypatch.setattr(cli, "run_data", boom)
    monkeypatch.setattr(cli, "COMMANDS", [dataclasses_replace(c, run=boom) if c.name == "data" else c
                                          for c in cli.COMMANDS])
    assert main(["data", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected ValueError: something odd" in err and "Traceback" not in err


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_corrupt_adapter_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    """Review defect 2 (CLI side): a corrupt adapter folder printed a JSONDecodeError traceback."""
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"")
    assert main(["select", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safegene: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "adapter_config.json" in err and not (tmp_path / "out").exists()


def test_none_on_the_command_line_clears_a_value_from_the_file(tmp_path, capsys):
    y = tmp_path / "show.yaml"
    y.write_text("action: show\nname: arithmetic\n")
    assert main(["data", "--config", str(y), "--name", "none"]) == 2  # the flag cleared the file's name
    assert "data show needs a NAME" in capsys.readouterr().err
    assert main(["data", "--config", str(y), "--set", "name=null"]) == 2
    assert "data show needs a NAME" in capsys.readouterr().err
    assert main(["data", "show", "arithmetic", "--name", "sst2"]) == 2  # the same field twice, differently
    assert "name is given twice" in capsys.readouterr().err


def test_run_card_of_an_earlier_command_is_replaced_not_merged(tmp_path):
    import time

    from safegene.runcard import RUN_CARD, run_card, write_run_card

    write_run_card(tmp_path, run_card("bench", {"n_harmful": 64}, started=time.perf_counter()))
    began = time.time() + 5  # the next command starts after the first card was written
    write_run_card(tmp_path, run_card("demo", {"quick": True}, started=time.perf_counter()), since=began)
    card = json.loads((tmp_path / RUN_CARD).read_text())
    assert card["kind"] == "demo" and card["config"] == {"quick": True}
    # a stage's card written during this command (same kind, after it began) is completed, keeping its fields
    (tmp_path / RUN_CARD).write_text(json.dumps({"kind": "finetune", "training": {"steps": 2}, "config": {"a": 1}}))
    write_run_card(tmp_path, run_card("finetune", {"a": 1}, started=time.perf_counter()), since=time.time() - 5)
    card = json.loads((tmp_path / RUN_CARD).read_text())
    assert card["training"] == {"steps": 2} and card["versions"]["torch"] and card["timings"]["total_s"] >= 0


def test_overwrite_is_offered_only_where_it_is_honoured():
    from safegene.cli import build_parser, command_parsers

    offered = {name for name, sub in command_parsers(build_parser()).items()
               if any("--overwrite" in a.option_strings for a in sub._actions)}
    assert offered == {"degrade", "finetune", "extract", "select", "recalibrate", "apply", "gate", "demo", "protect",
                       "eval"}


def test_bench_refuses_a_max_steps_it_would_ignore(capsys):
    assert main(["bench", "--max-steps", "5"]) == 2
    assert "train.max_steps is not used by the bench" in capsys.readouterr().err


def test_running_one_command_imports_only_its_own_config():
    """Building every command's flags imported every stage module, the server's (and with it FastAPI) included,
    for a `data list`."""
    import subprocess
    import sys

    code = ("import sys; from safegene.cli import main; main(['data', 'list']); "
            "print(sorted(m for m in ('safegene.serve.server', 'fastapi', 'safegene.protect', 'safegene.bench') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
