"""Tests for jaxaccel.data: corpus split, tokenizer, token streams, batches, bits/byte."""

import math
import os

import numpy as np
import pytest

from jaxaccel import data

TRICKY = [
    "",
    "a",
    " ",
    "\t\tindented\t",
    "trailing spaces   ",
    "   leading spaces",
    "\r\n",
    "line1\r\nline2\rline3\n",
    "\n\n\n",
    "emoji 😀👩‍👩‍👧‍👦🏳️‍🌈",
    "中文字符 日本語 한국어",
    "combining e\u0301 a\u0308 \u0915\u093f",
    "zero width \u200b\u200d\ufeff BOM",
    "\x00\x01\x7f control",
    "def f(x):\n    return x ** 2  # comment\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral \U0010fffd",
    "مرحبا bidi \u202e",
]


def _random_unicode(rng, n):
    """n random strings over all planes (no surrogates), biased to ASCII and whitespace."""
    out = []
    for _ in range(n):
        length = rng.integers(0, 40)
        cps = []
        for _ in range(length):
            kind = rng.integers(4)
            if kind == 0:
                cps.append(int(rng.integers(0x20, 0x7F)))
            elif kind == 1:
                cps.append(int(rng.choice([0x09, 0x0A, 0x0D, 0x20])))
            else:
                cp = int(rng.integers(0x80, 0x110000))
                cps.append(cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD)
        out.append("".join(map(chr, cps)))
    return out


def _all_stdlib_py():
    """Independent enumeration of the stdlib corpus (os.walk, not pathlib)."""
    root = data.stdlib_root()
    names = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages") and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".py"):
                names.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return names


@pytest.fixture(scope="module")
def tok():
    texts = (t for d in data.list_documents("train") if (t := data.read_text(d)) is not None)
    return data.train_tokenizer(texts, vocab_size=512, max_bytes=300_000)


@pytest.fixture
def small_corpus(tmp_path):
    """A tiny extra-dir corpus: f0..f39 put 34 files in train, 3 in test (see split_of)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"f{i}.txt").write_text(f"# file {i}\nx = {i} * 2\nprint('héllo', x)\n" * 3)
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00binary")  # not UTF-8: skipped
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")
    return root


# ------------------------------------------------------------------------------ corpus


def test_split_deterministic_disjoint_and_complete():
    splits = {s: [d.name for d in data.list_documents(s)] for s in data.SPLITS}
    again = {s: [d.name for d in data.list_documents(s)] for s in data.SPLITS}
    assert splits == again
    sets = {s: set(v) for s, v in splits.items()}
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]
    assert sets["train"] | sets["validation"] | sets["test"] == _all_stdlib_py()
    assert not any("site-packages" in n for n in sets["train"])
    total = sum(map(len, sets.values()))
    assert 0.85 < len(sets["train"]) / total < 0.95
    assert 0.02 < len(sets["test"]) / total < 0.08


def test_split_pinned_values():
    # Pinned so that a change of hash (e.g. to the salted builtin hash) is caught:
    # the split must agree across machines and runs.
    assert data.split_of("os.py") == "test"
    assert data.split_of("json/__init__.py") == "validation"
    assert data.split_of("asyncio/tasks.py") == "train"
    assert [data.split_of(f"f{i}.txt") for i in (6, 9, 11, 19)] == ["validation", "test", "validation", "test"]


def test_split_depends_only_on_relative_path(tmp_path):
    # The same relative paths under another root (another machine's stdlib) split the same.
    names = ["os.py", "json/__init__.py", "asyncio/tasks.py", "email/utils.py", "zipfile.py"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    stdlib = {d.name: s for s in data.SPLITS for d in data.list_documents(s)}
    moved = {d.name: s for s in data.SPLITS for d in data.list_documents(s, [tmp_path], include_stdlib=False)}
    assert moved == {n: stdlib[n] for n in names}
    assert set(moved.values()) == {"train", "validation", "test"}


def test_extra_dir_listing(small_corpus):
    docs = {s: data.list_documents(s, [small_corpus], include_stdlib=False) for s in data.SPLITS}
    assert [d.name for d in docs["test"]] == ["f19.txt", "f20.txt", "f9.txt"]
    assert len(docs["train"]) == 34 + 1  # + blob.bin, listed but unreadable
    assert not any(".hidden" in d.name for ds in docs.values() for d in ds)
    assert len(data.load_texts("train", [small_corpus], include_stdlib=False)) == 34  # blob.bin skipped


def test_missing_corpus_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        data.list_documents("train", [missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.list_documents("train", [empty], include_stdlib=False)
    with pytest.raises(ValueError, match="empty corpus"):
        data.list_documents("train", [], include_stdlib=False)
    with pytest.raises(ValueError, match="unknown split"):
        data.list_documents("dev")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_basics(tok):
    assert data.eos_id(tok) == 0
    assert tok.get_vocab_size() == 512
    ids = tok.encode("def main():\n    return None\n").ids
    assert len(ids) < len("def main():\n    return None\n")  # merges learned from code


def test_round_trip_arbitrary_utf8(tok):
    rng = np.random.default_rng(0)
    for s in TRICKY + _random_unicode(rng, 300):
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s, repr(s)


def test_token_byte_lengths(tok):
    lengths_v = data.token_byte_lengths(tok)
    assert lengths_v.shape == (tok.get_vocab_size(),)
    assert lengths_v[data.eos_id(tok)] == 0
    rng = np.random.default_rng(1)
    for s in TRICKY + _random_unicode(rng, 50):
        assert lengths_v[tok.encode(s).ids].sum() == len(s.encode("utf-8")), repr(s)


def test_save_load_and_transformers(tok, tmp_path):
    path = data.save_tokenizer(tok, tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.json"
    for loaded in (data.load_tokenizer(tmp_path / "model"), data.load_tokenizer(path)):
        assert data.tokenizer_hash(loaded) == data.tokenizer_hash(tok)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for s in TRICKY:
        assert hf.encode(s) == tok.encode(s).ids
        assert hf.decode(hf.encode(s)) == s


def test_max_bytes_limits_training_text():
    texts = ["aaaa bbbb " * 1000, "zzzz qqqq " * 1000]
    tok_a = data.train_tokenizer(texts, vocab_size=300, max_bytes=5_000)
    assert tok_a.token_to_id("aaaa") is not None
    assert tok_a.token_to_id("zzzz") is None  # second text never seen
    with pytest.raises(ValueError):
        data.train_tokenizer(texts, vocab_size=100)


# ----------------------------------------------------------------------- token streams


def test_tokenize_documents_separates_with_eos(tok):
    docs = ["first doc\n", "second <|endoftext|> literal", "", "third"]
    tokens = data.tokenize_documents(tok, docs, chunk=2)  # chunk=2: crosses chunk borders
    assert tokens.dtype == np.int32
    eos = data.eos_id(tok)
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) == len(docs) and ends[-1] == len(tokens) - 1  # literal text is not EOS
    pieces = np.split(tokens, ends + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs


def test_token_stream_cache_reuse(tok, small_corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = data.token_stream(tok, "train", cache, [small_corpus], include_stdlib=False)
    assert (cache / "tokens_train.npy").is_file() and (cache / "tokens_train.json").is_file()
    assert (first == data.eos_id(tok)).sum() == 34

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_documents", boom)
        np.testing.assert_array_equal(data.token_stream(tok, "train", cache, [small_corpus], include_stdlib=False), first)
        # A changed file, another tokenizer or another split must not reuse it.
        (small_corpus / "f0.txt").write_text("changed")
        with pytest.raises(AssertionError, match="re-tokenized"):
            data.token_stream(tok, "train", cache, [small_corpus], include_stdlib=False)
    changed = data.token_stream(tok, "train", cache, [small_corpus], include_stdlib=False)
    assert len(changed) < len(first)
    other_tok = data.train_tokenizer(["abc abd abe"] * 50, vocab_size=270)
    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_documents", boom)
        with pytest.raises(AssertionError, match="re-tokenized"):
            data.token_stream(other_tok, "train", cache, [small_corpus], include_stdlib=False)
        # Metadata of another split, even under this split's file name, is not reused.
        for ext in ("npy", "json"):
            (cache / f"tokens_test.{ext}").write_bytes((cache / f"tokens_train.{ext}").read_bytes())
        with pytest.raises(AssertionError, match="re-tokenized"):
            data.token_stream(tok, "test", cache, [small_corpus], include_stdlib=False)


def test_batch_at_deterministic_and_resumable():
    tokens = np.arange(1000, dtype=np.int32)
    b, t = 4, 16
    full_run = [data.batch_at(tokens, 7, s, b, t) for s in range(10)]
    resumed = [data.batch_at(tokens, 7, s, b, t) for s in range(5, 10)]
    for x, y in zip(full_run[5:], resumed):
        np.testing.assert_array_equal(x, y)
    assert full_run[0].shape == (b, t + 1) and full_run[0].dtype == np.int32
    assert not np.array_equal(full_run[0], full_run[1])
    assert not np.array_equal(full_run[0], data.batch_at(tokens, 8, 0, b, t))
    for row in np.concatenate(full_run):  # each row is a contiguous window of the stream
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + t + 1))


def test_batch_at_covers_all_starts_and_rejects_short():
    tokens = np.arange(20, dtype=np.int32)
    starts = np.concatenate([data.batch_at(tokens, 0, s, 8, 8)[:, 0] for s in range(50)])
    assert set(starts.tolist()) == set(range(12))  # 20 - (8 + 1) + 1 possible starts
    with pytest.raises(ValueError, match="too short"):
        data.batch_at(tokens, 0, 0, 1, 20)


def test_eval_windows_tile_targets():
    tokens = np.arange(14, dtype=np.int32)
    w = data.eval_windows(tokens, seq_len=4)
    assert w.shape == (3, 5) and w.dtype == np.int32
    np.testing.assert_array_equal(w[:, 1:].ravel(), np.arange(1, 13))
    np.testing.assert_array_equal(w[:, 0], [0, 4, 8])
    assert data.eval_windows(tokens, 4, max_windows=2).shape == (2, 5)
    with pytest.raises(ValueError):
        data.eval_windows(tokens, seq_len=14)


def test_bits_per_byte():
    # A uniform model over 256 byte values costs exactly 8 bits per byte.
    assert data.bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0)
    # 3 tokens of ln(2) nats each (3 bits) covering 6 bytes -> 0.5 bits/byte.
    assert data.bits_per_byte(3 * math.log(2), 6) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        data.bits_per_byte(1.0, 0)


# ----------------------------------------------------------------------------- prompts


def test_sample_prompts_deterministic_from_test_split():
    prompts = data.sample_prompts("test", n=5, num_chars=200, seed=3)
    assert prompts == data.sample_prompts("test", n=5, num_chars=200, seed=3)
    assert prompts != data.sample_prompts("test", n=5, num_chars=200, seed=4)
    assert all(len(p) == 200 for p in prompts)
    test_texts = data.load_texts("test")
    for p in prompts:
        owners = [t for t in test_texts if p in t]
        assert owners, "prompt does not come from the test split"
        i = owners[0].find(p)
        assert i == 0 or owners[0][i - 1] == "\n"  # line-aligned
    with pytest.raises(ValueError, match="only"):
        data.sample_prompts("test", n=10_000)
