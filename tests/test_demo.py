"""python -m infer.demo: the main job end to end on the shipped model, and clear errors when the
shipped files are damaged."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from pathlib import Path

from infer import demo
from jaxaccel.pretrained import SHIPPED_DIR

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--model", "small", "--num-prompts", "2", "--prompt-len", "16", "--max-new-tokens", "12", "--drafter", "none"]


def test_demo_on_the_small_shipped_model_runs_its_shipped_heads(tmp_path, capsys):
    assert demo.main([*SMALL, "--no-compilation-cache", "--json", "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shipped"] and report["temperature"] == 0
    assert [r["method"] for r in report["rows"]] == ["ar", "hydra", "eagle"]
    for row in report["rows"]:
        assert row["identical_to_ar"] is True and row["tokens_per_s"] > 0
    assert all(r["mean_accepted_tokens"] > 1.0 for r in report["rows"][1:]), "the shipped heads drafted nothing"
    assert report["sample"]["completion"]
    assert (tmp_path / "out" / "demo.md").read_text().startswith("model: ")


def test_heads_auto_is_every_shipped_heads_on_its_tuned_tree():
    """`--heads auto` expands before the tree is resolved, so each shipped heads keeps its tree.json."""
    from jaxaccel.pretrained import shipped_heads_dirs

    args = demo.parse_args(["--model", "small", "--heads", "auto"])
    _, heads_dirs, _ = demo.resolve_inputs(args)
    assert heads_dirs == shipped_heads_dirs() and len(heads_dirs) == 2
    assert demo.resolve_tree_spec("auto", heads_dirs) == "auto"


def damaged_copy(tmp_path, rel, how):
    """The shipped directory as symlinks (the 40 MB stay where they are), with `rel` deleted or
    replaced by a copy with one bit flipped."""
    dest = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, dest, copy_function=os.symlink)
    target = dest / rel
    data = target.read_bytes()
    target.unlink()
    if how == "flip":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    return dest


@pytest.mark.parametrize("rel, how, message", [
    ("heads/eagle/heads.safetensors", "flip", "heads/eagle/heads.safetensors is corrupt"),
    ("model/model.safetensors", "delete", "model/model.safetensors is missing"),
])
def test_damaged_shipped_files_stop_the_demo_with_a_message_that_says_what_to_do(tmp_path, capsys, rel, how, message):
    shipped = damaged_copy(tmp_path, rel, how)
    assert demo.main([*SMALL, "--no-compilation-cache", "--shipped-dir", str(shipped)]) == demo.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "python -m infer.demo --train" in err


@pytest.mark.parametrize("argv, message", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--model", "no-such-model"], "neither a model directory nor a model name"),
])
def test_bad_arguments_exit_2_naming_the_problem(capsys, argv, message):
    assert demo.main([*argv, "--no-compilation-cache"]) == demo.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_demo_on_a_chat_model_answers_spec_bench_questions_through_its_template(tmp_path, capsys):
    from chat_models import build_chat_model

    model_dir = build_chat_model(tmp_path / "chat")
    argv = ["--model", str(model_dir), "--num-prompts", "3", "--max-new-tokens", "6", "--repeats", "1",
            "--no-compilation-cache", "--json"]
    assert demo.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    # No heads ship for it: AR and the default training-free drafter, prompt lookup.
    assert report["chat"] and report["heads"] == [] and [r["method"] for r in report["rows"]] == ["ar", "pld:depth=2"]
    assert report["rows"][1]["identical_to_ar"] is True
    assert len({p["category"] for p in report["prompts"]}) == 3  # spread over Spec-Bench's subtasks
    assert report["sample"]["question"] and "<|im_start|>" not in report["sample"]["completion"]


def test_demo_default_is_smollm2_answering_a_spec_bench_question(tmp_path):
    from jaxaccel.models import DEFAULT_MODEL, is_ready

    if not is_ready(DEFAULT_MODEL):
        pytest.skip(f"{DEFAULT_MODEL} is not prepared here (python -m infer.models --prepare {DEFAULT_MODEL})")
    # The README's main job as a user runs it: its own process, its persistent compilation cache.
    cache = tmp_path / "jax-cache"
    proc = subprocess.run([sys.executable, "-m", "infer.demo", "--num-prompts", "1", "--max-new-tokens", "16",
                           "--repeats", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAXACCEL_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert any(cache.iterdir()), "nothing was written to the persistent compilation cache"
    assert (tmp_path / "demo.md").read_text().startswith("model: ")
    assert proc.stdout.startswith(f"model: {Path.home()}") or "smollm2-135m-instruct" in proc.stdout
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["chat"] and report["rows"][0]["identical_to_ar"] is True
    # The first heads shipped for it (jaxaccel/pretrained/smollm2-135m-instruct: EAGLE-3, then Hydra++, both
    # stored in bfloat16) are found, and so are its committed answers, REST's corpus; the head, REST and
    # prompt lookup sharing six nodes, and their union decode identically.
    assert [r["method"] for r in report["rows"]] == ["ar", "eagle3", "share", "eagle3+share"]
    assert all(r["identical_to_ar"] is True for r in report["rows"])
    assert len(report["sample"]["completion"].split()) >= 3, report["sample"]
