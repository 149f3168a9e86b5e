"""What `tunesmith serve` serves: the model specs from the config, each model loaded once (adapters that share
a base become adapters of one PeftModel)."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import Config
from tunesmith.generate import template_for
from tunesmith.serve.llama_cpp import GgufModel, gguf_file, load_gguf
from tunesmith.serve.scheduler import LoadedModel


def model_specs(cfg: Config) -> dict[str, str]:
    """serve.models, or by default {"base": model.name, "tuned": out_dir/final (if trained)}."""
    if cfg.serve.models:
        return dict(cfg.serve.models)
    specs = {"base": cfg.model.name}
    if (Path(cfg.out_dir) / "final").is_dir():
        specs["tuned"] = str(Path(cfg.out_dir) / "final")
    return specs


def _adapter_base(path: str) -> str | None:
    """The base model an adapter dir (or run dir with an adapter in final/) names; None for anything else."""
    p = Path(path)
    p = p / "final" if (p / "final").is_dir() else p
    conf = p / "adapter_config.json"
    return json.loads(conf.read_text())["base_model_name_or_path"] if conf.is_file() else None


def _same(a: str, b: str) -> bool:
    """Two model specs name the same model (same string, or the same directory)."""
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def load_models(cfg: Config, specs: dict[str, str]) -> dict[str, LoadedModel | GgufModel]:
    """Load each model: under serve.engine llama.cpp, the entries naming a GGUF go to llama.cpp as they are
    (every GGUF path checked before anything loads); the rest to tunesmith's engine."""
    files = {n: gguf_file(n, p) for n, p in specs.items()} if cfg.serve.engine == "llama.cpp" else {}
    out: dict[str, LoadedModel | GgufModel] = {n: load_gguf(n, f, cfg) for n, f in files.items() if f}
    out.update(_load_ours(cfg, {n: p for n, p in specs.items() if n not in out}))
    return {name: out[name] for name in specs}


def _load_ours(cfg: Config, specs: dict[str, str]) -> dict[str, LoadedModel]:
    """Load each model once. Adapters on a base that is also served, or shared by several adapters, become
    adapters of ONE PeftModel (switched per batch); any other model loads on its own (adapters merged)."""
    from tunesmith.model.export import load_for_inference
    from tunesmith.runtime import device

    dev = device()
    bases = {name: _adapter_base(path) for name, path in specs.items()}
    out: dict[str, LoadedModel] = {}
    for base in dict.fromkeys(b for b in bases.values() if b is not None):
        adapters = [n for n, b in bases.items() if b == base]
        plain = [n for n, b in bases.items() if b is None and _same(specs[n], base)]
        if len(adapters) > 1 or plain:
            out.update(_load_shared(cfg, base, {n: specs[n] for n in adapters}, plain, dev))
    for name, path in specs.items():
        if name not in out:
            model, tokenizer, stored = load_for_inference(path, cfg.model, dev)
            out[name] = LoadedModel(name, model, tokenizer, template_for(stored, cfg))
    return {name: out[name] for name in specs}


def _load_shared(
    cfg: Config, base: str, adapters: dict[str, str], plain: list[str], dev
) -> dict[str, LoadedModel]:
    from peft import PeftModel

    from tunesmith.model.load import TEMPLATE_FILE, load_model, load_template, load_tokenizer

    base_cfg = cfg.model.model_copy(update={"name": base})
    model, base_tok = load_model(base_cfg, dev), load_tokenizer(base_cfg)
    peft, out = None, {}
    for i, (name, path) in enumerate(adapters.items()):
        d = Path(path) / "final" if (Path(path) / "final").is_dir() else Path(path)
        tag = f"adapter{i}"  # PEFT adapter names are module keys: served names may hold dots or slashes
        if peft is None:
            peft = PeftModel.from_pretrained(model, str(d), adapter_name=tag)
        else:
            peft.load_adapter(str(d), adapter_name=tag)
        # the adapter's own saved tokenizer when it has one, through load_tokenizer's checks like the base's
        tok = (
            load_tokenizer(base_cfg.model_copy(update={"name": str(d)}))
            if (d / "tokenizer_config.json").is_file()
            else base_tok
        )
        stored = load_template(d) if (d / TEMPLATE_FILE).is_file() else None
        out[name] = LoadedModel(name, peft, tok, template_for(stored, cfg), adapter=tag)
    peft.eval()
    for name in plain:
        out[name] = LoadedModel(name, peft, base_tok, template_for(None, cfg), adapter=None)
    return out
