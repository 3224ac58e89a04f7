"""Chat: templates as transformers renders them, generate --chat, chunked (streaming) decoding, infer.chat."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers

from chat_models import IM_END, build_chat_model, chat_tokenizer
from infer.generate import main as generate_main
from jaxaccel.chat import ChatTemplate
from jaxaccel.chat_session import ChatSession
from jaxaccel.decoding import AutoregressiveDecoder, Greedy, Sampler, generate
from jaxaccel.decoding.stream import TokenStream, stream_text
from jaxaccel.hf import load_hf, save_hf

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, who are you?"}],
    [SYSTEM, {"role": "user", "content": "  What is a café in Zürich? 🙂 "}],
    [SYSTEM, {"role": "user", "content": "Name a module."}, {"role": "assistant", "content": "argparse."},
     {"role": "user", "content": "And another?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two", "tool_calls": None}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {v: build_chat_model(tmp_path_factory.mktemp(v), v) for v in ("chatml", "chatml_file", "chatml_list", "bos")}


def assert_like_transformers(model_dir, conversations):
    chat, reference = ChatTemplate.from_model_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    for messages in conversations:
        for add in (True, False):
            text = reference.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            ids = reference.apply_chat_template(messages, add_generation_prompt=add, tokenize=True, return_dict=False)
            assert chat.render(messages, add_generation_prompt=add) == text
            assert chat.encode(messages, add_generation_prompt=add) == list(ids)


@pytest.mark.parametrize("variant", ["chatml", "chatml_file", "chatml_list", "bos"])
def test_rendering_and_ids_match_transformers(dirs, variant):
    assert_like_transformers(dirs[variant], CONVERSATIONS)
    if variant == "bos":  # one BOS, the template's: the post-processor's would be a second
        ids = ChatTemplate.from_model_dir(dirs[variant]).encode(CONVERSATIONS[0])
        assert ids.count(3) == 1 and ids[0] == 3


def real_smollm2_dir():
    from jaxaccel.models import is_ready, model_dir

    if not is_ready("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not prepared (python -m infer.models --prepare smollm2-135m-instruct)")
    return model_dir("smollm2-135m-instruct")


def test_real_smollm2_template_matches_transformers():
    model_dir = real_smollm2_dir()
    assert_like_transformers(model_dir, CONVERSATIONS)
    assert ChatTemplate.from_model_dir(model_dir).stop_ids == (2,)  # <|im_end|>


def test_stop_ids_include_the_templates_end_of_turn(dirs):
    assert ChatTemplate.from_model_dir(dirs["chatml"]).stop_ids == (IM_END,)
    # eos is <|endoftext|> everywhere in the files; <|im_end|> is found in the template itself.
    assert ChatTemplate.from_model_dir(dirs["bos"]).stop_ids == (0, IM_END)


def test_no_template_and_template_errors_are_value_errors(tmp_path, dirs):
    plain = build_chat_model(tmp_path / "plain", "plain")
    with pytest.raises(ValueError, match=f"{plain} has no chat template"):
        ChatTemplate.from_model_dir(plain)
    with pytest.raises(ValueError, match="refused the conversation: unknown role: tool"):
        ChatTemplate.from_model_dir(dirs["bos"]).render([{"role": "tool", "content": "x"}])


# --- generate --chat ---------------------------------------------------------------------------------

def stop_early(model_dir, out_dir, messages, at=2):
    """A copy of the model that ends its greedy answer to `messages` with <|im_end|> after `at` tokens:
    the LM head columns of <|im_end|> and of the token it would emit there are swapped."""
    model, chat = load_hf(model_dir), ChatTemplate.from_model_dir(model_dir)
    tokens = generate(model, [chat.encode(messages)], max_new_tokens=12).sequences()[0]
    at = next(i for i in range(at, len(tokens)) if tokens[i] not in tokens[:i])
    kernel = np.array(model.lm_head.kernel[...])
    kernel[:, [tokens[at], IM_END]] = kernel[:, [IM_END, tokens[at]]]
    model.lm_head.kernel[...] = kernel
    save_hf(model, out_dir, tokenizer=chat.tokenizer)
    for name in ("tokenizer_config.json", "generation_config.json"):
        (out_dir / name).write_bytes((model_dir / name).read_bytes())
    return out_dir, tokens[:at]


@pytest.fixture(scope="module")
def stopping(dirs, tmp_path_factory):
    messages = [SYSTEM, {"role": "user", "content": "Hello"}]
    return stop_early(dirs["chatml"], tmp_path_factory.mktemp("stopping"), messages), messages


def run_json(capsys, *args):
    assert generate_main([*map(str, args), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_chat_stops_at_the_end_of_turn(stopping, capsys):
    (model_dir, before), messages = stopping
    rows = run_json(capsys, "--model", model_dir, "--prompt", "Hello", "--chat", "--system", SYSTEM["content"],
                    "--max-new-tokens", 10)
    chat = ChatTemplate.from_model_dir(model_dir)
    assert rows[0]["prompt"] == "Hello"
    assert rows[0]["tokens"] == before + [IM_END] and rows[0]["num_tokens"] == len(before) + 1
    assert rows[0]["finish_reason"] == "stop"
    assert rows[0]["completion"] == chat.tokenizer.decode(before) and "im_end" not in rows[0]["completion"]
    assert set(rows[0]) == {"prompt", "completion", "tokens", "num_tokens", "finish_reason", "tokens_per_s",
                            "mean_accepted_tokens"}
    # Text mode prints the same completion.
    assert generate_main(["--model", str(model_dir), "--prompt", "Hello", "--chat", "--system", SYSTEM["content"],
                          "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == rows[0]["completion"] + "\n"


def test_generate_chat_batches_match_the_library(dirs, tmp_path, capsys):
    texts = ["Hi", "What is json?", "Tell me about logging in Zürich"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    rows = run_json(capsys, "--model", dirs["bos"], "--prompt-file", tmp_path / "p.jsonl", "--chat",
                    "--max-new-tokens", 6, "--temperature", 0.8, "--seed", 2)
    chat = ChatTemplate.from_model_dir(dirs["bos"])
    from infer.generate import batch_seed

    want = generate(load_hf(dirs["bos"]), [chat.encode([{"role": "user", "content": t}]) for t in texts],
                    policy=Sampler(0.8), max_new_tokens=6, stop_tokens=[0, IM_END], seed=batch_seed(2, 0)).sequences()
    assert [r["prompt"] for r in rows] == texts
    assert [r["tokens"] for r in rows] == want


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--system", "x"], "--system needs --chat"),
    (["--prompt", "hi", "--chat", "PLAIN"], "has no chat template"),
])
def test_generate_chat_bad_input(dirs, tmp_path, capsys, args, message):
    model = str(build_chat_model(tmp_path / "plain", "plain")) if "PLAIN" in args else str(dirs["chatml"])
    assert generate_main(["--model", model, *[a for a in args if a != "PLAIN"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


# --- chunked decoding and streaming ------------------------------------------------------------------

def test_chunked_decoding_equals_one_shot(dirs):
    decoder = AutoregressiveDecoder(load_hf(dirs["chatml"]))
    chat = ChatTemplate.from_model_dir(dirs["chatml"])
    prompts = [chat.encode(m) for m in CONVERSATIONS[:2]]
    policy, kw = Sampler(0.9, top_k=40), dict(max_new_tokens=11, stop_tokens=[IM_END, 7], seed=5)
    want = decoder.generate(prompts, policy=policy, **kw)
    for max_steps in (1, 3):
        state, stop_ids = decoder.start(prompts, policy=policy, **kw)
        for _ in range(100):
            state = decoder.advance(state, stop_ids, policy=policy, max_steps=max_steps)
            if bool(np.all(state.result.done_b)):
                break
        got = jax.device_get(state.result)
        for name in ("tokens_bn", "num_generated_b", "num_steps_b", "done_b"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_chunked_speculative_decoding_equals_one_shot():
    from jaxaccel.decoding.speculative import SpeculativeDecoder
    from jaxaccel.heads import load_heads
    from jaxaccel.pretrained import SHIPPED_DIR

    model_dir = SHIPPED_DIR / "model"
    decoder = SpeculativeDecoder(load_hf(model_dir), load_heads(SHIPPED_DIR / "heads" / "eagle", model_dir))
    prompt = chat_tokenizer().encode("def main(argv):\n    parser = argparse.").ids  # ids < the small vocab
    want = decoder.generate([prompt], max_new_tokens=24)
    stream = TokenStream(decoder, prompt, max_new_tokens=24, chunk_seconds=0.0)  # one step per chunk
    chunks = list(stream)
    assert sum(chunks, []) == want.sequences()[0]
    assert len(chunks) > 2 and stream.result.mean_accepted_tokens() == want.mean_accepted_tokens()


def test_stream_text_joins_to_decode_with_multibyte_characters():
    tokenizer = chat_tokenizer()
    ids = tokenizer.encode("Café 東京 🙂 naïve").ids + [IM_END]
    pieces = list(stream_text(tokenizer, [[t] for t in ids], skip_ids=[IM_END]))
    assert "".join(pieces) == tokenizer.decode(ids[:-1]) == "Café 東京 🙂 naïve"
    assert all("\ufffd" not in p for p in pieces)
    split = tokenizer.encode("🙂").ids  # one character, several byte tokens, cut off: decode's replacement
    assert "".join(stream_text(tokenizer, [split[:1]])) == tokenizer.decode(split[:1])


def test_chat_session_streams_the_completion_and_keeps_the_history(dirs):
    model_dir = dirs["chatml"]
    chat, model = ChatTemplate.from_model_dir(model_dir), load_hf(model_dir)
    session = ChatSession(AutoregressiveDecoder(model), chat, max_new_tokens=6, log=lambda m: None)
    history = []
    for text in ("Hi", "And then?"):
        history.append({"role": "user", "content": text})
        want = generate(model, [chat.encode(history)], max_new_tokens=6, stop_tokens=[IM_END]).sequences()[0]
        streamed = "".join(session.reply(text))
        assert streamed == chat.tokenizer.decode([t for t in want if t != IM_END])
        assert session.last.tokens == want and session.last.tokens_per_s > 0
        history.append({"role": "assistant", "content": streamed})
    assert session.messages == history
    session.reset()
    assert session.messages == []
    with pytest.raises(ValueError, match="too long"):
        list(session.reply("word " * 300))
    assert session.messages == []


def test_infer_chat_end_to_end(stopping):
    (model_dir, before), messages = stopping
    proc = subprocess.run([sys.executable, "-m", "infer.chat", "--model", str(model_dir), "--system",
                           SYSTEM["content"], "--max-new-tokens", "8"],
                          input="Hello\nAnd now?\n/exit\nnever read\n".encode(), capture_output=True, cwd=REPO,
                          timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr.decode()
    chat, model = ChatTemplate.from_model_dir(model_dir), load_hf(model_dir)
    first = chat.tokenizer.decode(before)  # the first answer ends at the end of turn
    history = [*messages, {"role": "assistant", "content": first}, {"role": "user", "content": "And now?"}]
    second = generate(model, [chat.encode(history)], max_new_tokens=8, stop_tokens=[IM_END]).sequences()[0]
    second = chat.tokenizer.decode([t for t in second if t != IM_END])
    assert proc.stdout.decode() == f"{first}\n{second}\n"
    stats = [line for line in proc.stderr.decode().splitlines() if line.startswith("[")]
    assert len(stats) == 2 and stats[0].startswith(f"[{len(before) + 1} tokens, ")
