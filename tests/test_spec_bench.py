"""python -m infer.spec_bench (Spec-Bench rows per category and overall, peers, skipped questions, bad
input) and python -m infer.bench --step-costs, on tiny models the tests build and the shipped small model."""

import json

import pytest

from infer import bench, spec_bench
from jaxaccel.pretrained import SHIPPED_DIR

ROW_KEYS = {"method", "category", "tokens_per_s", "mean_accepted_tokens", "speedup", "identical_to_ar"}


def write_questions(path, per_category: dict[str, list[str]]) -> str:
    """A question file in Spec-Bench's format."""
    lines, qid = [], 1
    for category, texts in per_category.items():
        for text in texts:
            lines.append(json.dumps({"question_id": qid, "category": category, "turns": [text, "A second turn."]}))
            qid += 1
    path.write_text("\n".join(lines) + "\n")
    return str(path)


SHORT = {"writing": ["Write a short note.", "Write a poem about logs."],
         "roleplay": ["Pretend to be a parser."],
         "translation": ["Translate: the path is a file."],
         "qa": ["What does json do?", "What is a test case?"]}


def run_json(capsys, argv) -> dict:
    assert spec_bench.main([*argv, "--json", "--no-progress", "--no-compilation-cache"]) == 0
    return json.loads(capsys.readouterr().out)


def test_chat_model_rows_per_category_and_overall_with_peers_and_skipped_questions(tmp_path, capsys):
    from chat_models import build_chat_model

    model_dir = build_chat_model(tmp_path / "chat", context=128)
    questions = write_questions(tmp_path / "q.jsonl", {**SHORT, "summarization": ["word " * 400]})
    out = tmp_path / "out"
    report = run_json(capsys, ["--model", str(model_dir), "--questions", questions, "--limit", "1",
                               "--max-new-tokens", "6", "--peers", "transformers", "--peer-threads", "1",
                               "--out", str(out)])
    assert report["skipped_too_long"] == {"total": 1, "by_category": {"summarization": 1}}
    assert report["num_questions"] == 4  # --limit 1: the first of writing, roleplay, translation, qa
    methods = ["ar", "transformers generate", "transformers prompt lookup"]
    categories = ["writing", "roleplay", "translation", "qa", "multi-turn conversation", "overall"]
    assert [(r["method"], r["category"]) for r in report["rows"]] == [(m, c) for c in categories for m in methods]
    for row in report["rows"]:
        assert ROW_KEYS <= set(row) and row["tokens_per_s"] > 0 and row["mean_accepted_tokens"] >= 1
        assert isinstance(row["identical_to_ar"], bool)
    overall = {r["method"]: r for r in report["rows"] if r["category"] == "overall"}
    assert overall["ar"]["speedup"] == 1.0 and overall["ar"]["num_questions"] == 4
    assert overall["ar"]["mean_accepted_tokens"] == 1.0
    assert overall["transformers generate"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert "float32" in overall["transformers generate"]["precision"]
    assert overall["ar"]["prefill_seconds"] > 0 and overall["transformers generate"]["prefill_seconds"] is None
    assert report["command"].startswith("python -m infer.spec_bench --model ")
    saved = json.loads((out / "spec_bench.json").read_text())
    assert saved["rows"] == report["rows"]
    md = (out / "spec_bench.md").read_text()
    assert "| method | precision | multi-turn conversation | translation | summarization | qa | math_reasoning | " \
           "rag | overall |" in md
    assert "Skipped (prompt + max new tokens do not fit the context): 1 (summarization 1)" in md


def test_shipped_heads_are_identical_to_ar_at_temperature_zero(tmp_path, capsys):
    questions = write_questions(tmp_path / "q.jsonl", {"writing": SHORT["writing"], "qa": SHORT["qa"][:1]})
    report = run_json(capsys, ["--model", "small", "--no-chat", "--questions", questions, "--max-new-tokens", "8",
                               "--heads", str(SHIPPED_DIR / "heads" / "hydra"),
                               "--heads", str(SHIPPED_DIR / "heads" / "eagle")])
    assert {r["method"] for r in report["rows"]} == {"ar", "hydra", "eagle"}
    assert {r["category"] for r in report["rows"]} == {"writing", "qa", "multi-turn conversation", "overall"}
    assert all(r["identical_to_ar"] is True for r in report["rows"])
    overall = {r["method"]: r for r in report["rows"] if r["category"] == "overall"}
    assert overall["ar"]["num_questions"] == 3 and overall["hydra"]["num_nodes"] > 1
    assert overall["eagle"]["mean_accepted_tokens"] > 1.0, "the shipped heads drafted nothing"


def test_temperature_above_zero_reports_identical_as_null(tmp_path, capsys):
    questions = write_questions(tmp_path / "q.jsonl", {"qa": SHORT["qa"][:1], "writing": SHORT["writing"]})
    # `small` has no chat template: the plain question, without being told --no-chat
    report = run_json(capsys, ["--model", "small", "--questions", questions, "--max-new-tokens", "4",
                               "--temperature", "1", "--subtask", "qa"])
    assert [(r["category"], r["identical_to_ar"]) for r in report["rows"]] == [("qa", None), ("overall", None)]
    assert report["chat"] is False


def test_warm_up_leaves_a_learning_drafter_as_it_found_it():
    """compile_buckets decodes once per method before timing; what Token Recycling learns then is
    forgotten, so the first timed question starts from the same empty table as without the warm-up."""
    from infer.speculative_rows import make_decoders
    from jaxaccel.decoding import Greedy
    from jaxaccel.hf import load_hf

    model = load_hf(SHIPPED_DIR / "model")
    decoders = make_decoders(model, SHIPPED_DIR / "model", [], [None], ["recycling"])
    recycling = decoders["recycling"][0]
    spec_bench.compile_buckets(decoders, [[5, 6, 7, 8, 5, 6], [9, 10]], policy=Greedy(), max_new_tokens=6, stop=[])
    assert recycling.carried is recycling.empty_carried


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "neither a model directory nor a model name"),
    (["--model", "small", "--limit", "0"], "--limit must be >= 1"),
    (["--model", "small", "--questions", "BAD"], "is not a Spec-Bench question"),
    (["--model", "small", "--limit", "1", "--subtask", "rag", "--questions", "QA_ONLY"], "no questions of subtask rag"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    if "BAD" in argv:
        (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "category": "qa"}\n')
        argv = [str(tmp_path / "bad.jsonl") if a == "BAD" else a for a in argv]
    if "QA_ONLY" in argv:
        argv = [write_questions(tmp_path / "qa.jsonl", {"qa": SHORT["qa"]}) if a == "QA_ONLY" else a for a in argv]
    assert spec_bench.main([*argv, "--no-chat", "--no-compilation-cache"]) == spec_bench.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_step_costs_tables_run_and_ratios_are_positive(tmp_path, capsys, monkeypatch):
    from infer import step_costs

    monkeypatch.setattr(step_costs, "CHAIN_SIZES", (1, 2, 8))  # each size is one more compiled forward
    out = tmp_path / "costs"
    assert bench.main(["--model", str(SHIPPED_DIR / "model"), "--step-costs", "--repeats", "1",
                       "--heads", str(SHIPPED_DIR / "heads" / "hydra"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(a) verify pass cost curve" in printed and "(c) speculative step" in printed
    report = json.loads((out / "step_costs.json").read_text())
    assert [r["n"] for r in report["chain"]] == [1, 2, 8]
    assert all(r["over_forward_1"] > 0 for r in report["chain"]) and report["chain"][0]["over_forward_1"] == 1.0
    assert report["ar"]["step_over_floor"] > 0
    assert [r["method"] for r in report["speculative"]] == ["hydra"]
    assert report["speculative"][0]["step_over_forward"] > 0 and report["in_loop_steps"] == [4, 20]
