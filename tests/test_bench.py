"""`safegene bench` end to end on a tiny random model: every method and row, the reports, and resumption."""

import json

import pytest
import yaml

from safegene.baselines import METHODS, default_methods
from safegene.cli import main
from safegene.bench import BenchConfig
from safegene.config import from_dict, load_config
from safegene.errors import ConfigError


def _config(tiny_qwen, out) -> dict:
    return {
        "model": str(tiny_qwen), "output": str(out), "tasks": ["arithmetic"], "judges": ["refusal-phrase"],
        "validate_judges": True, "n_harmful": 6, "over_refusal": "benign-sensitive", "n_over_refusal": 4,
        "n_task": 4, "generation": {"max_new_tokens": 6, "batch_size": 8},
        "train": {"batch_size": 2, "max_length": 48, "rank": 2, "alpha": 4, "learning_rate": 5e-3},
        "degrade_examples": 4, "degrade_steps": 2, "task_examples": 4, "task_steps": 2, "select_prompts": 3,
        "top_k": 1, "shots": 2, "recal_steps": 2, "realign_steps": 1,
        "attacks": ["past-tense", "multi-turn"], "n_attack": 3, "attack_methods": ["aligned", "safegene"],
        "self_critique": {"critique_tokens": 4, "revise": "always"}, "guard": {"guard": f"llm:{tiny_qwen}", "n_calibration": 4},
        "mixed_safety_ratio": 0.5, "reattack_methods": ["undefended", "safegene", "classifier-guard", "mixed-ft"],
        "reattack_examples": 2, "reattack_steps": [1, 2],
    }


class Contrarian:
    """Flags exactly what the phrase judge does not: κ with it must come out at -1 or undefined."""

    name = "contrarian"

    def judge_batch(self, prompts, responses):
        from safegene.evaluation import RefusalPhraseJudge
        from safegene.evaluation.judges import Verdict

        return [Verdict(not v.harmful, "x") for v in RefusalPhraseJudge().judge_batch(prompts, responses)]


def _register_contrarian_judge(monkeypatch) -> None:
    """`get_judge("contrarian")` returns a Contrarian; every other name resolves as before."""
    import safegene.evaluation.judges as judges_mod

    real_get = judges_mod.get_judge
    monkeypatch.setattr(judges_mod, "get_judge", lambda spec, *placement: Contrarian() if spec == "contrarian"
                        else real_get(spec, *placement))


def test_bench_runs_every_method_and_resumes(tiny_qwen, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_qwen, out)))
    assert main(["bench", str(cfg_path)]) == 0
    first = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["A", "D", "T[arithmetic]"] + [f"T[arithmetic]+{METHODS[m].label}" for m in default_methods()]
    assert not {"safegene-preference", "safegene-robust-shots"} & set(default_methods())  # experimental: named only
    for r in res["rows"]:
        h = r["harmful"]["refusal-phrase"]
        assert h["overall"]["n"] == 6 and sum(c["n"] for c in h["by_category"].values()) == 6
        assert len(r["verdicts"]["refusal-phrase"]) == 6
        assert h["overall"]["k"] == r["verdicts"]["refusal-phrase"].count("1")
        if r["name"] != "D":
            assert r["over_refusal"]["n"] == 4 and r["over_refusal"]["source"] == "benign-sensitive"
    assert res["rows"][0]["utility"]["arithmetic"]["n"] == 4
    attacked = [r["name"] for r in res["rows"] if r.get("attacks")]
    assert attacked == ["A", "T[arithmetic]+SafeGene"]
    for r in res["rows"]:
        for name, attack in r.get("attacks", {}).items():
            assert attack["refusal-phrase"]["overall"]["n"] == 3
            # per prompt too, for the paired tests under attack
            verdicts = r["attack_verdicts"][name]["refusal-phrase"]
            assert len(verdicts) == 3 and verdicts.count("1") == attack["refusal-phrase"]["overall"]["k"]
    # T was not run under attack here: SafeGene is tested against A on each attack's prompts
    under_attack = res["paired"]["attacks"]["comparisons"]
    assert {(c["attack"], c["row"], c["vs"], c["judge"], c["n"]) for c in under_attack} == {
        (a, "T[arithmetic]+SafeGene", "A", j, 3) for a in ("past-tense", "multi-turn") for j in res["config"]["judges"]}
    by = {r["method"]: r for r in res["rows"]}
    assert by["safegene"]["layers"] == res["selected_layers"] and len(res["selected_layers"]) == 1
    assert by["safegene-alpha1"]["coefficients"] == {str(res["selected_layers"][0]): 1.0}
    assert len(by["safegene-all-layers"]["layers"]) == 2
    assert len(set(by["resta"]["coefficients"].values())) == 1  # one global coefficient
    assert all(by[m]["build_seconds"] is not None for m in default_methods())
    assert res["judges"]["validation"]["refusal-phrase"]["n"] >= 300
    for k in ("degrade_s", "finetune_arithmetic_s", "extract_s", "select_s", "safegene_arithmetic_s",
              "realign_arithmetic_s", "total_s"):
        assert k in res["timings"]
    md = (out / "results.md").read_text()
    assert "| T[arithmetic] + SafeGene |" in md and "over-refusal" in md and "κ vs human" in md
    assert "under attack" in md and "multi-turn (refusal-phrase, n=3)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Safe LoRA" in html and "model: " + str(tiny_qwen) in html
    assert "[extract] ->" in first
    assert not list(out.glob("results.partial.*"))  # a finished run leaves only its results

    # the competitors that are not weight updates: priced per request, and what they did is on record
    t_row = by["undefended"]
    crit = by["self-critique"]
    stored = [json.loads(l) for l in (out / "responses" / "T_arithmetic_self-critique.harmful.jsonl").open()]
    assert all({"draft", "critique"} <= set(r["meta"]) and r["tokens"] >= 1 for r in stored)
    assert crit["cost"]["harmful"]["tokens"] > t_row["cost"]["harmful"]["tokens"]  # three generations, not one
    assert crit["cost"]["task:arithmetic"]["seconds"] > 0
    guard = by["classifier-guard"]
    assert {"threshold", "balanced_accuracy"} <= set(guard["defence"]) and guard["defence"]["n_harmful"] == 4
    assert 0 <= guard["cost"]["harmful"]["flagged"] <= 6 and "flagged" in guard["cost"]["over_refusal"]
    assert by["mixed-ft"]["data"]["n_safety"] == 2 and by["mixed-ft"]["build_seconds"] > 0
    assert "mixed-ft_arithmetic_s" in res["timings"]
    # re-attack: each defended model fine-tuned again, harmful prompts only; a guard keeps guarding
    assert [(r["method"], r["reattack"]["steps"]) for r in res["reattack"]] == [
        (m, s) for m in ["undefended", "safegene", "classifier-guard", "mixed-ft"] for s in (1, 2)]
    re = {r["method"]: r for r in res["reattack"] if r["reattack"]["steps"] == 1}
    assert all(r["harmful"]["refusal-phrase"]["overall"]["n"] == 6 for r in res["reattack"])
    assert re["safegene"]["name"] == "T[arithmetic]+SafeGene re-attacked 1 steps"
    assert re["safegene"]["defence_row"] == "T[arithmetic]+SafeGene" and "over_refusal" not in re["safegene"]
    assert "flagged" in re["classifier-guard"]["cost"]["harmful"]
    assert "re-attack" in md and "Inference cost per request" in md and "guard refusals on benign" in md

    # a second run reuses every stage and every stored generation
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "responses").glob("*.jsonl")}
    # harmful for 13 rows, over-refusal and task answers for all but D, 2 attacks x 2 rows, harmful for 4 x 2
    # re-attacked rows
    assert len(stamps) == 3 * 13 - 2 + 2 * 2 + 8
    assert main(["bench", str(cfg_path)]) == 0
    second = capsys.readouterr().out
    assert "training ->" not in second and "[extract] reusing" in second and "[safegene arithmetic] reusing" in second
    assert "[re-attack" not in second and "[classifier-guard arithmetic] reusing what it stored" in second
    assert {p.name: p.stat().st_mtime_ns for p in (out / "responses").glob("*.jsonl")} == stamps
    assert json.loads((out / "results.json").read_text())["rows"][3]["harmful"] == res["rows"][3]["harmful"]

    # a judge added afterwards reads the stored responses: no generation, same n, agreement recomputed
    _register_contrarian_judge(monkeypatch)
    assert main(["rejudge", str(out), "--judge", "contrarian", "--no-validate"]) == 0
    capsys.readouterr()
    res2 = json.loads((out / "results.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in (out / "responses").glob("*.jsonl")} == stamps
    for r in res2["rows"] + res2["reattack"]:
        a, b = r["verdicts"]["refusal-phrase"], r["verdicts"]["contrarian"]
        assert all(x != y for x, y in zip(a, b)) and r["harmful"]["contrarian"]["overall"]["n"] == 6
    for r in res2["rows"]:
        for name, attack in r.get("attacks", {}).items():
            assert attack["contrarian"]["overall"]["k"] == 3 - attack["refusal-phrase"]["overall"]["k"]
            by_judge = r["attack_verdicts"][name]
            assert len(by_judge["contrarian"]) == 3
            assert all(x != y for x, y in zip(by_judge["refusal-phrase"], by_judge["contrarian"]))
    kappa = res2["judges"]["agreement"]["contrarian vs refusal-phrase"]
    assert kappa["agreement"]["k"] == 0 and kappa["agreement"]["n"] == 13 * 6
    assert "contrarian" in res2["config"]["judges"] and "harmful rate, contrarian" in (out / "results.md").read_text()

    # a run from before attack verdicts (and their files' hashes) were recorded: rejudge fills them for the judges it
    # runs, from the one stored file per attack that has the row's n answers, and tests them in pairs
    old = json.loads((out / "results.json").read_text())
    del old["eval"]["attack_tags"], old["paired"]
    for r in old["rows"]:
        r.pop("attack_verdicts", None)
    (out / "results.json").write_text(json.dumps(old))
    assert main(["rejudge", str(out), "--judge", "contrarian", "--no-validate"]) == 0
    capsys.readouterr()
    res3 = json.loads((out / "results.json").read_text())
    assert {r["name"]: set(r["attack_verdicts"]["past-tense"]) for r in res3["rows"] if r.get("attack_verdicts")} == {
        "A": {"contrarian"}, "T[arithmetic]+SafeGene": {"contrarian"}}
    assert {(c["attack"], c["judge"]) for c in res3["paired"]["attacks"]["comparisons"]} == {
        ("past-tense", "contrarian"), ("multi-turn", "contrarian")}
    # a second answer file of the same attack and size, e.g. from an earlier attack set: which one was judged is
    # unknowable, so rejudge says so instead of picking one
    stored = next((out / "responses").glob("A.attack-past-tense-*.jsonl"))
    stale = stored.with_name("A.attack-past-tense-00000000.jsonl")
    stale.write_text(stored.read_text())
    (out / "results.json").write_text(json.dumps(old))
    assert main(["rejudge", str(out), "--judge", "contrarian", "--no-validate"]) == 2
    assert "2 stored answer files for attack past-tense with 3 answers" in capsys.readouterr().err
    # with the hashes recorded (every run now), the judged file is opened by name and the stale one ignored
    (out / "results.json").write_text(json.dumps(res2))
    assert main(["rejudge", str(out), "--judge", "contrarian", "--no-validate"]) == 0
    stale.unlink()


def test_bench_config_rejects_unknown_method(tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        BenchConfig(methods=["safegene", "magic"])
    p = tmp_path / "c.yaml"
    p.write_text("n_harmful: 3\nprojection: {fraction: 0.25}\n")
    cfg = load_config(BenchConfig, p)
    assert cfg.n_harmful == 3 and cfg.projection.fraction == 0.25 and cfg.projection.merge_weight == 0.5


def test_bench_fails_early_on_unknown_task(tmp_path):
    from safegene.bench import run_bench
    from safegene.errors import DataError

    with pytest.raises((DataError, ConfigError), match="sst3"):
        run_bench(BenchConfig(tasks=["sst3"], output=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()  # nothing written


def test_stage_config_match_tolerates_options_added_later_at_their_default():
    from safegene.config import to_dict
    from safegene.stages import same_config as _same
    from safegene.training import FinetuneConfig

    cfg = FinetuneConfig(task="sst2", poison_ratio=0.1)
    old = {k: v for k, v in to_dict(cfg).items() if k not in ("safety_ratio", "safety_data")}  # an older run's record
    assert _same(old, cfg)
    assert not _same(old, FinetuneConfig(task="sst2", poison_ratio=0.1, safety_ratio=0.2))  # the new option is used
    assert not _same({**old, "poison_ratio": 0.2}, cfg)
    assert not _same({**old, "retired": 1}, cfg)  # a recorded option this version does not know
    nested = to_dict(cfg)
    nested["train"].pop("max_grad_norm")
    assert _same(nested, cfg)


def test_stage_keys_leave_out_command_line_fields():
    """Review finding: the CLI's `adapter`/`output` fields of SelectConfig and RecalibrateConfig entered the bench's
    stage keys, so a bench folder from before no longer matched and every method was rebuilt."""
    from safegene.config import settings
    from safegene.recalibration import RecalibrateConfig
    from safegene.stages import same_config
    from safegene.selection import SelectConfig

    # the keys an earlier version recorded: every field of the config as it was then
    old_select = ["model", "harmful", "benign", "n_harmful", "n_benign", "method", "refusal_text", "linearize",
                  "top_k", "threshold", "batch_size", "seed"]
    old_recal = ["task_model", "harmful", "refusals", "refusal_text", "task", "n_harmful", "n_task", "utility_weight",
                 "alpha_max", "alpha_init", "steps", "batch_size", "learning_rate", "max_length", "tied", "seed"]
    # (the recalibration of that version was the Adam fit; today's default is the line search, see below)
    for cfg, old in ((SelectConfig(adapter="a", output="o"), old_select),
                     (RecalibrateConfig(adapter="a", output="o", optimizer="adam"), old_recal)):
        recorded = {k: v for k, v in settings(cfg).items() if k in old}
        assert list(settings(cfg)) == old
        assert same_config({"stage": recorded}, {"stage": settings(cfg)})
    # a stage recorded by the Adam fit is not today's default recalibration
    recorded = {k: v for k, v in settings(RecalibrateConfig(optimizer="adam")).items()}
    assert not same_config({"stage": recorded}, {"stage": settings(RecalibrateConfig())})


def test_stored_answers_are_dropped_only_for_the_kind_whose_decoding_changed(tmp_path):
    """A shorter over-refusal limit must keep the (long) harmful answers; a new harmful limit drops them and their
    attack variants. The older flat manifest (one decoding for all kinds) is read as per-kind."""
    import json

    from safegene.bench import BenchConfig, _eval_sets
    from safegene.generation import GenerationConfig

    responses = tmp_path / "responses"
    cfg = BenchConfig(tasks=["sst2"], harmful="advbench", n_harmful=4, over_refusal="benign-sensitive",
                      n_over_refusal=3, generation=GenerationConfig(max_new_tokens=96, batch_size=4))
    sets = _eval_sets(cfg, responses)
    names = ("A.harmful.jsonl", "A.attack-jailbreak-1234abcd.jsonl", "A.over_refusal.jsonl", "A.task-sst2-xy.jsonl")

    def fill():
        for n in names:
            (responses / n).write_text("{}\n")

    # rewrite the manifest in the older flat form, as a run from before this change left it
    flat = {"harmful": [p.prompt for p in sets.harmful], "over_refusal": [p.prompt for p in sets.over_refusal],
            "generation": json.loads((responses / "manifest.json").read_text())["harmful"]["generation"]}
    (responses / "manifest.json").write_text(json.dumps(flat))
    fill()
    _eval_sets(cfg, responses)  # same settings: the flat manifest matches, nothing dropped
    assert sorted(f.name for f in responses.glob("A.*")) == sorted(names)

    shorter = BenchConfig(**{**cfg.__dict__, "over_refusal_tokens": 48})
    sets = _eval_sets(shorter, responses)
    assert sets.over_refusal_generation(shorter.generation).max_new_tokens == 48
    assert sorted(f.name for f in responses.glob("A.*")) == sorted(n for n in names if "over_refusal" not in n)

    fill()
    longer = BenchConfig(**{**shorter.__dict__, "generation": GenerationConfig(max_new_tokens=128, batch_size=4)})
    _eval_sets(longer, responses)
    # the harmful answers and their attack variants go; over-refusal keeps its own 48-token limit; task answers stay
    assert sorted(f.name for f in responses.glob("A.*")) == ["A.over_refusal.jsonl", "A.task-sst2-xy.jsonl"]


def test_a_stopped_bench_leaves_the_rows_it_finished(tiny_qwen, tmp_path, monkeypatch):
    """A run longer than a session is stopped mid-way: results.partial.json/.md hold every finished row."""
    import safegene.bench as bench_mod

    out = tmp_path / "bench"
    cfg = {**_config(tiny_qwen, out), "methods": ["safegene-alpha1", "safe-lora"], "attacks": [],
           "reattack_methods": [], "validate_judges": False}
    real = bench_mod._evaluate_defended
    calls = []

    def stop_at_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends here
        return real(*a, **kw)

    monkeypatch.setattr(bench_mod, "_evaluate_defended", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        bench_mod.run_bench(from_dict(BenchConfig, cfg), progress=False)
    part = json.loads((out / "results.partial.json").read_text())
    assert part["complete"] is False and not (out / "results.json").exists()
    assert [r["name"] for r in part["rows"]] == ["A", "D", "T[arithmetic]", "T[arithmetic]+SafeGene, α=1 (no recalibration)"]
    assert part["rows"][3]["harmful"]["refusal-phrase"]["overall"]["n"] == 6
    md = (out / "results.partial.md").read_text()
    assert md.startswith("**Partial: 4 row(s) finished") and "| T[arithmetic] + SafeGene, α=1 (no recalibration) |" in md


def test_a_reattacked_model_is_protected_again(tiny_qwen, tmp_path, capsys, monkeypatch):
    """Issue 15: after a re-attack the user runs the defence again on the re-attacked model. Re-attacked T gets every
    re-protect method, a re-attacked SafeGene row SafeGene again; each is built from the re-attacked weights (saved
    once as a model folder), evaluated like a defended T, reused on a re-run and judged again by `rejudge`."""
    from safegene.bench import REATTACK_CARD, run_bench

    out = tmp_path / "bench"
    cfg = from_dict(BenchConfig, {
        **_config(tiny_qwen, out), "methods": ["safegene", "resta", "safe-lora"], "attacks": [],
        "validate_judges": False, "reattack_methods": ["undefended", "safegene"], "reattack_steps": [1],
        # Safe LoRA reads T's task update: from a re-attacked (merged) model it is extracted against A
        "reprotect_methods": ["safegene", "resta", "safe-lora"]})
    res = run_bench(cfg, progress=False)
    capsys.readouterr()
    re_t, re_sg = "T[arithmetic] re-attacked 1 steps", "T[arithmetic]+SafeGene re-attacked 1 steps"
    assert [r["name"] for r in res["reattack"]] == [re_t, re_sg]
    assert [(r["name"], r["method"]) for r in res["reprotect"]] == [
        (f"{re_t} + re-protected SafeGene", "safegene"), (f"{re_t} + re-protected RESTA", "resta"),
        (f"{re_t} + re-protected Safe LoRA", "safe-lora"), (f"{re_sg} + re-protected SafeGene", "safegene")]
    for r in res["reprotect"]:
        assert r["harmful"]["refusal-phrase"]["overall"]["n"] == 6 and len(r["verdicts"]["refusal-phrase"]) == 6
        assert r["over_refusal"]["n"] == 4 and r["utility"]["arithmetic"]["n"] == 4
        info = r["reprotect"]
        assert info["method"] == r["method"] and info["steps"] == 1 and info["seconds"] >= 0
        assert info["of"] == r["name"].split(" + re-protected ")[0] and r["build_seconds"] == info["seconds"]
    # the re-attacked models were kept once, as merged model folders carrying the card they were trained under
    for method in ("undefended", "safegene"):
        folder = out / "reattack" / "arithmetic" / f"{method}-1" / "model"
        assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
        assert json.loads((folder / REATTACK_CARD).read_text()) == json.loads(
            (out / "reattack" / "arithmetic" / f"{method}-1.json").read_text())
    # SafeGene recalibrated on the re-attacked model: the same layers, new coefficients, fitted on that folder (the
    # tiny random model barely moves them: compared as stored, the rows round them to 4 decimals)
    first = next(r for r in res["rows"] if r["method"] == "safegene")
    assert res["reprotect"][3]["layers"] == first["layers"]
    fitted = {name: json.loads((folder / "safegene.json").read_text())["recalibration"] for name, folder in (
        ("T", out / "methods" / "arithmetic" / "safegene"),
        ("again", out / "reattack" / "arithmetic" / "safegene-1" / "reprotected" / "safegene"))}
    # fitted anew on the re-attacked weights: another gradient (the line search may still land both on the same bounds)
    assert fitted["again"]["history"][0]["gradient"] != fitted["T"]["history"][0]["gradient"]
    assert fitted["again"]["task_model"] == str(out / "reattack" / "arithmetic" / "safegene-1" / "model")
    alone = [f["objective"]["task_model_alone"]["refusal_nll"] for f in fitted.values()]
    assert alone[0] != alone[1]  # the refusal loss of the model it started from: another model
    assert len(set(res["reprotect"][1]["coefficients"].values())) == 1  # RESTA refitted: one global coefficient
    md, html = (out / "results.md").read_text(), (out / "report.html").read_text()
    assert "Re-protected after a re-attack" in md and f"| {re_sg} + re-protected SafeGene |" in md
    assert "<h2>Re-protected after a re-attack</h2>" in html and f"{re_t} + re-protected RESTA" in html

    # a second run reuses the re-attacked models, the re-protections and every stored answer
    def stored():
        return {str(p.relative_to(out)): p.stat().st_mtime_ns
                for p in [*(out / "responses").glob("*.jsonl"), *(out / "reattack").rglob("*")] if p.is_file()}

    stamps = stored()
    assert sum(1 for p in stamps if "re-protected" in p) == 4 * 3  # harmful, over-refusal, task per row
    res2 = run_bench(cfg, progress=False)
    second = capsys.readouterr().out
    assert "training ->" not in second and "[re-attack" not in second and "LoRA steps" not in second
    assert second.count("[re-protect arithmetic: ") == 4 and "+ safegene] reusing" in second
    assert stored() == stamps
    assert [r["harmful"] for r in res2["reprotect"]] == [r["harmful"] for r in res["reprotect"]]

    # a re-attacked model that was not kept (a run from before re-protection) is trained again, answers again with the
    # model it keeps, and what was built on it is rebuilt; the other re-attack stays as it was
    import shutil

    shutil.rmtree(out / "reattack" / "arithmetic" / "safegene-1" / "model")
    run_bench(cfg, progress=False)
    third = capsys.readouterr().out
    assert f"{re_sg}: no kept model" in third and third.count("[re-attack arithmetic]") == 2  # the notice + training
    assert f"[re-protect arithmetic: {re_sg} + safegene] ->" in third
    assert f"[re-protect arithmetic: {re_t} + safegene] reusing" in third
    assert (out / "reattack" / "arithmetic" / "safegene-1" / "model" / REATTACK_CARD).is_file()
    changed = {p for p, t in stored().items() if stamps.get(p) != t}
    assert "responses/T_arithmetic_SafeGene_re-attacked_1_steps.harmful.jsonl" in changed
    assert not any(p.startswith(("reattack/arithmetic/undefended-1", "responses/T_arithmetic_re-attacked"))
                   for p in changed)

    # rejudge judges the re-protected rows' stored answers too
    _register_contrarian_judge(monkeypatch)
    assert main(["rejudge", str(out), "--judge", "contrarian", "--no-validate"]) == 0
    res3 = json.loads((out / "results.json").read_text())
    assert len(res3["reprotect"]) == 4
    for r in res3["reprotect"]:
        a, b = r["verdicts"]["refusal-phrase"], r["verdicts"]["contrarian"]
        assert len(b) == 6 and all(x != y for x, y in zip(a, b))
    assert "re-protected (contrarian, 95% CI)" in (out / "results.md").read_text()


def test_reprotect_methods_must_be_rebuildable_weight_updates():
    base = {"methods": ["safegene", "resta", "self-critique", "classifier-guard", "mixed-ft"],
            "reattack_methods": ["undefended"]}
    for responder_or_retrain in ("self-critique", "classifier-guard", "mixed-ft"):
        with pytest.raises(ConfigError, match=f"reprotect_methods.*{responder_or_retrain}.*cannot be re-applied"):
            from_dict(BenchConfig, {**base, "reprotect_methods": ["safegene", responder_or_retrain]})
    with pytest.raises(ConfigError, match="not in methods"):
        from_dict(BenchConfig, {**base, "reprotect_methods": ["safe-lora"]})
    with pytest.raises(ConfigError, match="no re-attacked row"):
        from_dict(BenchConfig, {**base, "reattack_methods": ["safegene"], "reprotect_methods": ["resta"]})
    assert from_dict(BenchConfig, {**base, "reprotect_methods": ["safegene", "resta"]}).reprotect_methods == [
        "safegene", "resta"]


def test_results_from_before_reprotection_still_read():
    from safegene.evaluation.results import BenchResults

    old = {"model": "m", "config": {"judges": ["refusal-phrase"]}, "rows": [], "reattack": [], "future": 1}
    res = BenchResults.from_dict(old)
    assert res.reprotect == [] and res.extra == {"future": 1}
    new = BenchResults.from_dict({**res.to_dict(), "reprotect": [{"name": "x", "reprotect": {"method": "safegene"}}]})
    assert [r.name for r in new.reprotect] == ["x"]
    assert new.to_dict()["reprotect"][0]["reprotect"]["method"] == "safegene"


def test_the_overall_eta_counts_only_rows_that_did_work(monkeypatch):
    import safegene.bench as bench_mod

    clock = iter([0.0, 0.0, 5.0, 605.0, 1805.0])  # start (twice); a reused row (5 s); two computed rows (10 and 20 min)
    monkeypatch.setattr(bench_mod.time, "perf_counter", lambda: next(clock))
    eta = bench_mod._RowClock(total=6)
    assert eta.tick(1, "A") == "[bench] 1/6 rows done (A); 0 min so far"
    assert eta.tick(2, "D") == "[bench] 2/6 rows done (D); 10 min so far, about 40 min left at 10.0 min a row"
    assert eta.tick(3, "T[x]") == "[bench] 3/6 rows done (T[x]); 30 min so far, about 45 min left at 15.0 min a row"
