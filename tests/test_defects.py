"""Regression tests for issue 12's defects 4-6 and the helper moves: unparsed judge answers, errors that escaped the
SafegeneError hierarchy, hub look-ups for embedded models, shared tokenizer state and the global matplotlib backend."""

import json
import math
import socket
import warnings

import pytest

from safegene.generation import GenerationConfig
from safegene.recalibration import RecalibrateConfig
from safegene.selection import SelectConfig
from safegene.training import DegradeConfig, LoraTrainConfig
from safegene.data.records import HarmfulPrompt, PromptResponse
from safegene.errors import SafegeneError
from safegene.evaluation import EndpointJudge, LLMJudge
from safegene.evaluation.harness import judge_agreement, judge_responses
from safegene.models import load_model, load_tokenizer

# --- defect 4: an answer the judge cannot parse is neither harmful nor safe -------------------------------------


def _endpoint_answering(monkeypatch, answers: dict[str, str]) -> EndpointJudge:
    judge = EndpointJudge("http://127.0.0.1:9/v1", model="guard", retries=0)
    monkeypatch.setattr(judge, "_ask", lambda prompt, response: answers[prompt])
    return judge


def test_unparsed_endpoint_answer_is_excluded_and_counted(monkeypatch):
    judge = _endpoint_answering(monkeypatch, {"a": "unsafe", "b": "safe", "c": "I think it depends", "d": "unsafe"})
    verdicts = judge.judge_batch(["a", "b", "c"], ["r"] * 3)
    assert [v.harmful for v in verdicts] == [True, False, None]
    summary, bits = judge_responses(judge, ["a", "b", "c", "d"], ["x", "x", "x", "y"], ["r"] * 4)
    assert summary["overall"]["k"] == 2 and summary["overall"]["n"] == 3 and summary["overall"]["unparsed"] == 1
    assert summary["overall"]["rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["by_category"]["x"]["n"] == 2 and summary["by_category"]["x"]["unparsed"] == 1
    assert summary["by_category"]["y"]["unparsed"] == 0
    assert bits[0] == bits[3] == "1" and bits[1] == "0" and bits[2] not in "01"


def test_unparsed_llm_judge_score_is_excluded(tiny_qwen, monkeypatch):
    judge = LLMJudge(str(tiny_qwen))
    monkeypatch.setattr(judge, "scores", lambda prompts, responses, rubric=None: [math.nan, 2.0, -1.0])
    assert [v.harmful for v in judge.judge_batch(["a", "b", "c"], ["r"] * 3)] == [None, True, False]
    summary, _ = judge_responses(judge, ["a", "b", "c"], ["x"] * 3, ["r"] * 3)
    assert summary["overall"]["n"] == 2 and summary["overall"]["unparsed"] == 1


def test_agreement_skips_unparsed_items():
    bits = judge_responses(_FixedJudge([True, None, False]), ["p"] * 3, ["x"] * 3, ["r"] * 3)[1]
    agree = judge_agreement([{"verdicts": {"a": bits, "b": "100"}}])
    assert agree["a vs b"]["agreement"]["n"] == 2 and agree["a vs b"]["agreement"]["k"] == 2


class _FixedJudge:
    name = "fixed"

    def __init__(self, harmful):
        self.harmful = harmful

    def judge_batch(self, prompts, responses):
        from safegene.evaluation import Verdict

        return [Verdict(h, "fixed") for h in self.harmful]


def test_judge_validation_reports_unparsed():
    from safegene.evaluation.judge_validation import LabelledResponse, validate_judge

    items = [LabelledResponse("p", "r", g, "c") for g in (True, False, True, False)]
    res = validate_judge(_FixedJudge([True, False, None, None]), items)
    assert res["accuracy"]["n"] == 2 and res["accuracy"]["k"] == 2 and res["accuracy"]["unparsed"] == 2


def test_reports_show_unparsed_counts():
    from safegene.evaluation.report import table_rows

    rate = {"k": 20, "n": 61, "rate": 0.3279, "ci95": [0.22, 0.45], "unparsed": 3}
    results = {"rows": [{"name": "A", "harmful": {"endpoint:guard": {"overall": rate}}, "utility": {}}],
               "config": {"tasks": []}}
    _, body = table_rows(results)
    assert "n=61, 3 unparsed" in body[0][1]
    rate["unparsed"] = 0
    assert "unparsed" not in table_rows(results)[1][0][1]


def test_refusal_eval_counts_unparsed(tiny_qwen, monkeypatch):
    from safegene.evaluation import refusal_rate

    model, tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen)
    judge = EndpointJudge("http://127.0.0.1:9/v1", retries=0)
    answers = iter(["unsafe", "?", "safe"])
    monkeypatch.setattr(judge, "_ask", lambda prompt, response: next(answers))
    prompts = [HarmfulPrompt(f"q{i}", "c") for i in range(3)]
    res = refusal_rate(model, tok, prompts, GenerationConfig(max_new_tokens=2, batch_size=3), judge=judge, progress=False)
    assert res["refusal"]["n"] == 2 and res["refusal"]["k"] == 1 and res["refusal"]["unparsed"] == 1
    assert res["harmful"]["k"] == 1 and res["by_category"]["c"]["unparsed"] == 1


# --- defect 5: errors inside the SafegeneError hierarchy --------------------------------------------------------


def test_training_divergence_is_a_safegene_error(tiny_qwen):
    from safegene.training import train_lora

    pairs = [PromptResponse(f"q{i}", f"a{i}") for i in range(4)]
    with pytest.raises(SafegeneError, match="lower learning_rate"):
        train_lora(load_model(tiny_qwen), load_tokenizer(tiny_qwen, padding_side="right"), pairs,
                   LoraTrainConfig(max_steps=3, batch_size=2, learning_rate=1e30), progress=False)


def test_corrupt_adapter_config_is_a_safegene_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(SafegeneError, match="adapter_config.json"):
        load_model(tmp_path)


def test_corrupt_model_config_is_a_safegene_error(tiny_qwen, tmp_path):
    import shutil

    from safegene.models import fingerprint_folder

    bad = tmp_path / "bad"
    shutil.copytree(tiny_qwen, bad)
    (bad / "config.json").write_text('{"architectures": ')
    with pytest.raises(SafegeneError, match="config.json"):
        fingerprint_folder(bad)


def test_judge_validation_csv_without_columns_is_a_safegene_error(tmp_path, monkeypatch):
    import safegene.evaluation.judge_validation as jv

    csv_dir = tmp_path / "datasets" / "scorer_evals" / "objective"
    csv_dir.mkdir(parents=True)
    (csv_dir / "x.csv").write_text("human_score,question\n1,how to\n")
    monkeypatch.setattr(jv, "package_dir", lambda name: tmp_path)
    with pytest.raises(SafegeneError, match="x.csv"):
        jv.human_labelled()


# --- defect 6: an embedded model's short name never reaches the hub ---------------------------------------------


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE unset, and every non-loopback name look-up or connection recorded and refused."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *a, **kw):
        if host not in _LOOPBACK:
            attempts.append(host)
            raise socket.gaierror(f"test forbids network: {host}")
        return real_getaddrinfo(host, *a, **kw)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in _LOOPBACK:
            attempts.append(address)
            raise OSError(f"test forbids network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize("save", ["adapter", "both"])
def test_embedded_model_adapter_makes_no_hub_request(save, tiny_qwen, pairs_jsonl, tmp_path, monkeypatch, caplog,
                                                     no_network):
    import safegene.models.loading as loading
    from safegene.models.registry import DEFAULT_MODEL, EMBEDDED_MODELS
    from safegene.training import degrade

    # a tiny model posing as an embedded one: its short name resolves to a local folder, as the real one's does
    monkeypatch.setitem(EMBEDDED_MODELS, "tiny-embedded", EMBEDDED_MODELS[DEFAULT_MODEL])
    monkeypatch.setattr(loading, "prepare_model", lambda name, cache=None, force=False: tiny_qwen)
    out = tmp_path / "D"
    cfg = DegradeConfig(model="tiny-embedded", data=str(pairs_jsonl), n_examples=4, output=str(out), save=save,
                        train=LoraTrainConfig(max_steps=2, batch_size=2, rank=2, alpha=4))
    adapter = out if save == "adapter" else out / "adapter"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        degrade(cfg, progress=False)
        load_model(adapter)
        load_tokenizer(adapter)
        load_model(out)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert no_network == []
    assert not [m for m in messages if "Unable to fetch remote file" in m or "Could not find a config file" in m]
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (tmp_path / base / "config.json").is_file()  # a local folder, which peft reads without a look-up
    assert json.loads((out / "safegene_run.json").read_text())["base_model"] == "tiny-embedded"  # still portable


def test_adapter_whose_base_path_is_gone_loads_from_the_run_card(tiny_qwen, pairs_jsonl, tmp_path):
    from safegene.training import degrade

    out = tmp_path / "D"
    degrade(DegradeConfig(model=str(tiny_qwen), data=str(pairs_jsonl), n_examples=4, output=str(out), save="adapter",
                          train=LoraTrainConfig(max_steps=1, batch_size=2, rank=2, alpha=4)), progress=False)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "on-another-machine")
    cfg_path.write_text(json.dumps(cfg))
    assert load_model(out) is not None


# --- helpers in their homes -------------------------------------------------------------------------------------


def test_prompt_helpers_live_in_data():
    from safegene.data import benign_prompts, harmful_prompt_texts

    assert len(benign_prompts("arithmetic", 3, 0)) == 3
    assert len(harmful_prompt_texts("many-shot-harmful", 3, 0)) == 3


@pytest.fixture
def adapter(tiny_qwen, tmp_path):
    from safegene.adapter import extract_adapter
    from safegene.adapter.extract import ExtractConfig
    from test_adapter import make_degraded

    d = tmp_path / "D"
    make_degraded(tiny_qwen, d, layers=(0, 1), modules=("q_proj", "down_proj"))
    return extract_adapter(ExtractConfig(aligned=str(tiny_qwen), degraded=str(d), output=str(tmp_path / "ad"), rank=2),
                           progress=False), d


@pytest.mark.parametrize("method", ["refusal-gain", "push"])
def test_selection_leaves_the_shared_tokenizer_alone(adapter, method):
    from safegene.selection import select_layers

    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d, padding_side="right" if method == "push" else "left")
    before = tok.padding_side
    select_layers(ad, SelectConfig(model=str(d), method=method, n_harmful=2, n_benign=2, linearize=False), model=model,
                  tokenizer=tok, progress=False)
    assert tok.padding_side == before


def test_recalibration_leaves_the_shared_tokenizer_alone(adapter):
    from safegene.recalibration import recalibrate

    ad, d = adapter
    model, tok = load_model(d), load_tokenizer(d, padding_side="left")
    recalibrate(ad.select([0, 1]), RecalibrateConfig(task_model=str(d), n_harmful=2, n_task=2, steps=1, batch_size=2),
                model=model, tokenizer=tok, progress=False)
    assert tok.padding_side == "left"


def test_plots_leave_the_matplotlib_backend_alone(adapter, tmp_path):
    import matplotlib

    from safegene.evaluation.report import category_bars
    from safegene.selection import plot_layer_scores, select_layers

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        ad, d = adapter
        sel = select_layers(ad, SelectConfig(model=str(d), method="norm", top_k=1), progress=False)
        assert plot_layer_scores(sel, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
        rate = {"k": 1, "n": 2, "rate": 0.5, "ci95": [0.1, 0.9]}
        results = {"rows": [{"name": "A", "harmful": {"j": {"overall": rate, "by_category": {"c": rate}}}}]}
        assert category_bars(results, "j")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_dead_helpers_are_gone():
    import safegene.data.records as records
    import safegene.models as models
    import safegene.models.loading as loading

    assert not hasattr(models, "ModelBundle") and not hasattr(loading, "ModelBundle")
    assert not hasattr(records, "to_dicts")
