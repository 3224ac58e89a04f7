"""Spec-Bench's questions: the field's benchmark for speculative decoding (an evaluation set only).

The file (`question.jsonl`, one JSON object a line: `question_id`, `category`, `turns`) lives in
the shared data beside the repository, `../shared/data/spec_bench/question.jsonl`. Its 13
categories form Spec-Bench's six subtasks: MT-bench's eight categories are "multi-turn
conversation"; translation, summarization, qa, math_reasoning and rag are one subtask each. Never
train on these questions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spec_bench" / "question.jsonl"
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Spec-Bench's subtasks, in its leaderboard's order.
SUBTASKS = {"multi-turn conversation": MT_BENCH, "translation": ("translation",),
            "summarization": ("summarization",), "qa": ("qa",), "math_reasoning": ("math_reasoning",),
            "rag": ("rag",)}


@dataclass(frozen=True)
class Question:
    """One Spec-Bench question: its id, category, and user turns (MT-bench has two)."""

    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def subtask(self) -> str:
        return subtask_of(self.category)


def subtask_of(category: str) -> str:
    """The Spec-Bench subtask a category belongs to (an unknown category is its own subtask)."""
    return next((name for name, cats in SUBTASKS.items() if category in cats), category)


def read_questions(path: str | os.PathLike | None = None) -> list[Question]:
    """The questions of a file in Spec-Bench's format (default: the shared question.jsonl)."""
    path = Path(path) if path is not None else DEFAULT_QUESTIONS
    if not path.is_file():
        hint = " (the shared data lives beside the repository: ../shared/data)" if path == DEFAULT_QUESTIONS else ""
        raise FileNotFoundError(f"no Spec-Bench question file at {path}{hint}")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            turns = record["turns"]
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t for t in turns)):
                raise ValueError("'turns' must be a non-empty list of non-empty strings")
            questions.append(Question(int(record["question_id"]), str(record["category"]), tuple(turns)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {number} is not a Spec-Bench question: {e}") from None
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def sample_questions(questions: list[Question], n: int, seed: int = 0) -> list[Question]:
    """`n` questions spread over the subtasks: subtasks in a seeded order, one random question of
    each in turn (then around again), so a handful already shows several kinds of text."""
    rng = np.random.default_rng(seed)
    by_subtask: dict[str, list[Question]] = {}
    for q in questions:
        by_subtask.setdefault(q.subtask, []).append(q)
    pools = [list(rng.permutation(len(qs))) for qs in by_subtask.values()]
    order = list(rng.permutation(len(by_subtask)))
    names = list(by_subtask)
    chosen = []
    while len(chosen) < min(n, len(questions)):
        for i in order:
            if pools[i] and len(chosen) < n:
                chosen.append(by_subtask[names[i]][pools[i].pop()])
    return chosen


def first_per_category(questions: list[Question], limit: int | None) -> list[Question]:
    """The first `limit` questions of each category in file order (all of them for None); a quick
    run that still covers every category."""
    if limit is None:
        return list(questions)
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    seen: dict[str, int] = {}
    chosen = []
    for q in questions:
        seen[q.category] = seen.get(q.category, 0) + 1
        if seen[q.category] <= limit:
            chosen.append(q)
    return chosen
