"""The recalibration's benign-but-sensitive shots stay apart from every over-refusal evaluation set."""

from safegene.data.sensitive import SENSITIVE_SHOTS, sensitive_shots
from safegene.data.taxonomy import normalise as _norm


def test_sensitive_shots_are_disjoint_from_over_refusal_evaluation_sets():
    from safegene.data import harmful_prompts, shared_data_dir

    shots = {_norm(p.prompt) for p in sensitive_shots()}
    assert len(shots) == 48 and {p.category for p in sensitive_shots()} == set(SENSITIVE_SHOTS)
    evaluation = {_norm(p.prompt) for p in harmful_prompts("benign-sensitive")}
    if shared_data_dir():
        evaluation |= {_norm(p.prompt) for p in harmful_prompts("shared:xstest-safe")}
        assert len(evaluation) > 250  # XSTest's 250 safe prompts were read
    assert not shots & evaluation


def test_recalibration_keeps_t_answers_on_sensitive_shots(tiny_qwen):
    """With `sensitive`, the KL-to-T term also covers T's own answers to the sensitive prompts."""
    from safegene.models import load_model, load_tokenizer
    from safegene.recalibration import RecalibrateConfig, sensitive_shots as shots_for

    model, tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen)
    cfg = RecalibrateConfig(task_model=str(tiny_qwen), sensitive="sensitive-shots", n_sensitive=5, sensitive_tokens=4)
    pairs = shots_for(cfg, model, tok)
    assert len(pairs) == 5 and all(p.response for p in pairs)
    assert {p.prompt for p in pairs} <= {p.prompt for p in sensitive_shots()}
    assert shots_for(RecalibrateConfig(task_model=str(tiny_qwen)), model, tok) == []
