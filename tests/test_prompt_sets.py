"""The prompt sets read from the shared data: Spec-Bench's questions (evaluation) and the training prompts."""

import json

import pytest

from jaxaccel.spec_bench import SUBTASKS, read_questions, sample_questions, subtask_of
from jaxaccel.training.prompts import FILES, read_train_prompts


def test_spec_bench_has_its_480_questions_in_six_subtasks():
    questions = read_questions()
    assert len(questions) == 480 and len({q.question_id for q in questions}) == 480
    counts = {name: sum(q.subtask == name for q in questions) for name in SUBTASKS}
    assert counts == {name: 80 for name in SUBTASKS}
    assert all(len(q.turns) == 2 for q in questions if q.subtask == "multi-turn conversation")


def test_a_handful_of_questions_covers_distinct_subtasks_and_is_seeded():
    questions = read_questions()
    chosen = sample_questions(questions, 6, seed=3)
    assert len({q.subtask for q in chosen}) == 6
    assert sample_questions(questions, 6, seed=3) == chosen != sample_questions(questions, 6, seed=4)
    assert len(sample_questions(questions, 20, seed=0)) == 20


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 1, "category": "qa"}', "'turns'"),
    ('{"question_id": 1, "category": "qa", "turns": []}', "non-empty list"),
    ("not json", "not a Spec-Bench question"),
])
def test_a_malformed_question_file_names_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 0, "category": "qa", "turns": ["hi"]}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match="line 2") as info:
        read_questions(path)
    assert message in str(info.value)
    with pytest.raises(FileNotFoundError, match="no Spec-Bench question file"):
        read_questions(tmp_path / "absent.jsonl")
    assert subtask_of("coding") == "multi-turn conversation" and subtask_of("new") == "new"


def test_training_prompts_come_from_the_three_files_without_their_answers():
    prompts = read_train_prompts()
    assert {p.source for p in prompts} == set(FILES)
    assert len(prompts) > 6000 and len({p.text for p in prompts}) == len(prompts)
    alpaca = next(p for p in prompts if p.source == "alpaca_data_cleaned_1000.json")
    assert alpaca.text == "Give three tips for staying healthy."  # the instruction, not its reference output
    spec_bench = {turn for q in read_questions() for turn in q.turns}
    assert not spec_bench & {p.text for p in prompts}, "a Spec-Bench question is among the training prompts"


def test_missing_training_prompt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="alpaca_data_cleaned_1000.json"):
        read_train_prompts(tmp_path)
