"""python -m train.self_prompts (Magpie: the chat model writes its own user messages) and
train.responses --prompts-file (answering them)."""

import json

import pytest
from chat_models import IM_END, build_chat_model
from test_responses import read_shards

from jaxaccel.chat import ChatTemplate
from jaxaccel.training.prompts import read_prompt_file
from train import responses, self_prompts

QUESTIONS = [{"question_id": 1, "category": "writing",
              "turns": ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
                        "cultural experiences and must-see attractions."]}]


def test_the_user_turn_prefix_is_the_template_up_to_the_users_text(tmp_path):
    template = ChatTemplate.from_model_dir(build_chat_model(tmp_path / "chat"))
    prefix = self_prompts.user_turn_prefix(template)
    full = template.encode(template.conversation("Where is Hawaii?"), add_generation_prompt=False)
    assert full[:len(prefix)] == prefix
    assert template.tokenizer.decode(prefix, skip_special_tokens=False).endswith("<|im_start|>user\n")
    assert "Where" in template.tokenizer.decode(full[len(prefix):])


def test_messages_are_dropped_for_each_reason_and_kept_otherwise():
    evaluation = self_prompts.word_runs(QUESTIONS[0]["turns"][0], 8)
    stop, seen = [IM_END], {"Tell me a joke."}
    reason = lambda tokens, text: self_prompts.drop_reason(tokens, text, stop, seen, evaluation, 8)  # noqa: E731
    assert reason([5, 6], "no end") == "unfinished"
    assert reason([IM_END], "") == "empty"
    assert reason([5, IM_END], "Tell me a joke.") == "repeat"
    assert reason([5, IM_END], "Please compose an engaging travel blog post about a recent trip to Hawaii!") \
        == "spec_bench_overlap"
    assert reason([5, IM_END], "Compose an engaging poem about a recent trip to the mountains.") is None  # 7 words shared


def test_generated_shards_add_up_are_seeded_and_resume(tmp_path):
    model_dir = build_chat_model(tmp_path / "chat", context=256)
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    args = ["--model", str(model_dir), "--count", "20", "--shard-size", "8", "--batch-size", "4", "--max-tokens",
            "24", "--questions", str(questions), "--no-progress"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert self_prompts.main([*args, "--out", str(first)]) == 0
    assert sorted(p.name for p in first.glob("shard-*.jsonl")) == [f"shard-0000{i}.jsonl" for i in range(3)]
    dropped = json.loads((first / "dropped.json").read_text())
    kept = self_prompts.written_prompts(first)
    assert len(kept) + sum(sum(d.values()) for d in dropped.values()) == 20
    assert len(set(kept)) == len(kept) and all(k.strip() == k and k for k in kept)

    # The same command elsewhere draws the same; with a shard missing, a rerun redoes just that one.
    assert self_prompts.main([*args, "--out", str(second)]) == 0
    assert self_prompts.written_prompts(second) == kept
    (second / "shard-00001.jsonl").unlink()
    before = (second / "shard-00000.jsonl").stat().st_mtime_ns
    assert self_prompts.main([*args, "--out", str(second)]) == 0
    assert self_prompts.written_prompts(second) == kept
    assert (second / "shard-00000.jsonl").stat().st_mtime_ns == before
    # Other settings into the same directory: an error naming them, nothing overwritten.
    assert self_prompts.main([*args[:-1], "--temperature", "0.7", "--out", str(second), "--no-progress"]) == 2


def test_responses_answer_a_prompt_file_and_refuse_a_grown_one(tmp_path):
    model_dir = build_chat_model(tmp_path / "chat", context=512)
    prompts = tmp_path / "self-prompts"
    prompts.mkdir()
    texts = ["How do I boil an egg?", "Write a haiku about rain.", "What is a prime number?", "Name three rivers."]
    (prompts / "shard-00000.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[:3]))
    assert [(p.source, p.index, p.text) for p in read_prompt_file(prompts)] == \
        [("self-prompts", i, t) for i, t in enumerate(texts[:3])]
    out = tmp_path / "answers"
    argv = ["--model", str(model_dir), "--prompts-file", str(prompts), "--out", str(out), "--shard-size", "2",
            "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]
    assert responses.main(argv) == 0
    records = read_shards(out)
    template = ChatTemplate.from_model_dir(model_dir)
    assert sorted(r["key"] for r in records) == [f"self-prompts:{i}" for i in range(3)]
    for r in records:
        assert r["prompt_ids"] == template.encode(template.conversation(texts[r["index"]]))
    (prompts / "shard-00001.jsonl").write_text(json.dumps({"prompt": texts[3]}) + "\n")
    assert responses.main(argv) == 2  # another prompt count would reorder the shards

    (prompts / "shard-00002.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="row 5"):
        read_prompt_file(prompts)
