"""Gemma 3 GGUF import, judged by transformers: transformers loading our converted directory must equal
transformers loading the GGUF file itself (weights, logits, tokenizer ids), and our own model on that
directory must match transformers' logits. Tiny llama.cpp-style files, bad inputs, and the real
Gemma 3 270M file where present."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf_fixtures import (GEMMA_DIMS, gemma_sample_texts, gemma_tokenizer_metadata, write_gemma_gguf,
                           write_gguf)
from tokenizers import Tokenizer

from jaxaccel import load_hf
from jaxaccel.gguf_import import GGUFError, convert_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

# Longer than the tiny files' sliding window (8), so the sliding layers differ from the global one.
PROMPT = "def f(x):\n    return x + 1  # 42 🤗 <end_of_turn>\n<start_of_turn>model\nand  some more text"


def hf_model(path: Path, gguf_file: str | None = None):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager", **kwargs).eval()


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def max_weight_difference(ours, reference) -> float:
    """The models hold the same tensors; their largest difference."""
    a, b = ours.state_dict(), reference.state_dict()
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def same_ids(ours_dir: Path, gguf_path: Path, texts: list[str]) -> int:
    """Our tokenizer.json and transformers on our directory give transformers' GGUF tokenizer's ids
    and decodings; the special tokens agree."""
    ours = Tokenizer.from_file(str(ours_dir / "tokenizer.json"))
    from_dir = transformers.AutoTokenizer.from_pretrained(ours_dir)
    reference = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in texts:
        expected = reference(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert from_dir(text)["input_ids"] == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == reference.decode(expected), text
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(from_dir, key) == getattr(reference, key), key
    return len(texts)


# ---------------------------------------------------------------------------------------------
# tiny files


@pytest.mark.parametrize("arch,qtype,tied", [("gemma3", "F32", True), ("gemma3", "Q5_0", False),
                                             ("gemma3", "Q4_K", True), ("gemma2", "Q8_0", True)])
def test_tiny_gemma_matches_transformers(tmp_path, arch, qtype, tied):
    path = write_gemma_gguf(tmp_path / "g.gguf", qtype, arch=arch, tied=tied, seed=2)
    out = convert_gguf(path, tmp_path / "out")
    reference, ours = hf_model(tmp_path, path.name), hf_model(out)
    assert type(ours).__name__ == {"gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM"}[arch]
    assert max_weight_difference(ours, reference) == 0.0  # norms back to w, nothing permuted
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(PROMPT).ids
    assert len(ids) > 2 * GEMMA_DIMS["sliding_window"]
    expected = logits(reference, ids)
    diff = float(np.abs(logits(ours, ids) - expected).max())
    jax_diff = float(np.abs(np.asarray(load_hf(out)(np.array([ids], np.int32))) - expected).max())
    print(f"tiny {arch} {qtype}: max abs logit difference {diff:.3g} (transformers), {jax_diff:.3g} (ours)")
    assert diff <= 1e-5 and jax_diff <= 1e-4
    for key in ("layer_types", "sliding_window", "rope_parameters", "head_dim", "query_pre_attn_scalar",
                "hidden_activation", "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping"):
        assert getattr(ours.config, key) == getattr(reference.config, key), key


def test_tiny_gemma3_norms_are_stored_back_as_w(tmp_path):
    """The GGUF holds 1 + w; the directory holds w exactly (transformers is not the only judge)."""
    from gguf_fixtures import gemma_weights
    from safetensors.numpy import load_file

    out = convert_gguf(write_gemma_gguf(tmp_path / "g.gguf", seed=3), tmp_path / "out")
    weights = gemma_weights(GEMMA_DIMS, len(gemma_tokenizer_metadata()[0]), tied=True, seed=3)
    ours = load_file(out / "model.safetensors")
    for gguf_name, hf_name in [("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
                               ("blk.0.ffn_norm.weight", "model.layers.0.pre_feedforward_layernorm.weight"),
                               ("blk.2.post_attention_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
                               ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
                               ("output_norm.weight", "model.norm.weight"),
                               ("blk.4.attn_q.weight", "model.layers.4.self_attn.q_proj.weight")]:
        np.testing.assert_allclose(ours[hf_name], weights[gguf_name], atol=1e-6, rtol=0, err_msg=hf_name)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"].count("full_attention") == 1 and config["layer_types"][5] == "full_attention"
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    pieces = gemma_tokenizer_metadata()[0]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [pieces.index("<eos>"), pieces.index("<end_of_turn>")]


def test_tiny_gemma3_tokenizer_matches_transformers(tmp_path):
    path = write_gemma_gguf(tmp_path / "g.gguf")
    out = convert_gguf(path, tmp_path / "out")
    assert same_ids(out, path, gemma_sample_texts()) > 200


def test_gemma3_files_the_importer_cannot_place_are_named(tmp_path):
    cases = {
        "missing tensor": (dict(drop=("blk.1.post_ffw_norm.weight",)), "lacks tensors"),
        "extra tensor": (dict(extra={"blk.0.attn_q.bias": np.zeros(512, np.float32)}),
                         "holds tensor 'blk.0.attn_q.bias'"),
        "layer count": (dict(metadata={"layers": 7}), "lacks tensors"),
        "head size": (dict(metadata={"head_dim": 128}), "has shape"),
        "odd head size": (dict(metadata={"head_dim": 255}), "key_length 255 cannot make a model"),
        "heads": (dict(metadata={"heads": 3, "kv_heads": 2}),
                  r"unusable config: num_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
        "no window": (dict(metadata={"sliding_window": None}), "lacks metadata gemma3.attention.sliding_window"),
        "no heads": (dict(metadata={"heads": None}), "lacks metadata gemma3.attention.head_count"),
    }
    for problem, (kwargs, message) in cases.items():
        path = write_gemma_gguf(tmp_path / "bad.gguf", **kwargs)
        with pytest.raises(GGUFError, match=message):
            convert_gguf(path, tmp_path / "out")
        assert not (tmp_path / "out").exists(), problem
    llama_as_gemma = write_gguf(tmp_path / "l.gguf", "llama", arch="gemma3")
    with pytest.raises(GGUFError, match="unsupported tokenizer.ggml.model|lacks"):
        convert_gguf(llama_as_gemma, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# the real Gemma 3 270M file (python -m infer.models --prepare gemma3-270m)


def gemma3_gguf() -> Path | None:
    from jaxaccel.models import gguf_path

    found = os.environ.get("JAXACCEL_GEMMA3_GGUF") or gguf_path("gemma3-270m")
    return Path(found) if Path(found).is_file() else None


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(the GGUF file, our directory converted from it now, transformers' GGUF-loaded model): loaded once."""
    path = gemma3_gguf()
    if path is None:
        pytest.skip("no Gemma 3 270M GGUF: run `python -m infer.models --prepare gemma3-270m` or set "
                    "JAXACCEL_GEMMA3_GGUF")
    return path, convert_gguf(path, tmp_path_factory.mktemp("gemma3") / "model"), hf_model(path.parent, path.name)


def test_gemma3_270m_matches_transformers(gemma3):
    path, out, reference = gemma3
    ours = hf_model(out)
    weights = max_weight_difference(ours, reference)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    worst = 0.0
    for prompt in ["The capital of France is", "def fib(n):\n    if n < 2:",
                   "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]:
        ids = tokenizer.encode(prompt).ids
        assert ids[0] == 2  # <bos>
        worst = max(worst, float(np.abs(logits(ours, ids) - logits(reference, ids)).max()))
    print(f"Gemma 3 270M: max abs weight difference {weights:.3g}, max abs logit difference {worst:.3g} "
          f"(transformers on our directory vs on the GGUF)")
    assert weights == 0.0 and worst <= 1e-5


def test_gemma3_270m_ours_matches_transformers(gemma3):
    """Our Transformer on the converted directory against transformers' GGUF loading. Logits reach
    ~100 here, so float32 sums in another order differ by ~1e-4."""
    path, out, reference = gemma3
    ours = load_hf(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    worst = 0.0
    for prompt in ["The capital of France is", "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]:
        ids = tokenizer.encode(prompt).ids
        expected = logits(reference, ids)
        got = np.asarray(ours(np.array([ids], np.int32)))
        worst = max(worst, float(np.abs(got - expected).max()))
        assert (got[0].argmax(-1) == expected[0].argmax(-1)).all()
    print(f"Gemma 3 270M: max abs logit difference {worst:.3g} (ours vs transformers on the GGUF)")
    assert worst <= 1e-3


def test_gemma3_270m_config_facts(gemma3):
    path, out, reference = gemma3
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (
        262144, 18, 640, 256)
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == [5, 11, 17]
    assert config["sliding_window"] == 512 and config["query_pre_attn_scalar"] == 256
    assert config["rope_parameters"] == {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    ours = transformers.AutoConfig.from_pretrained(out).to_dict()
    theirs = reference.config.to_dict()
    skip = {"_name_or_path", "_model_name_or_path", "architectures", "dtype", "unk_token_id", "transformers_version",
            "quantization_config"}  # the GGUF loading says where it came from
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>


def test_gemma3_270m_tokenizer_matches_transformers(gemma3):
    path, out, _ = gemma3
    assert same_ids(out, path, gemma_sample_texts()) > 200
