"""GGUF export: llama.cpp's own converter and quantizer run on a plain HF dir (a LoRA adapter merged first).

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py`) ships inside
llama-cpp-python's source package; `make` copies it to `<venv>/share/llama.cpp/`. It runs as a subprocess of
this Python so its imports (torch, its own gguf-py) never mix with ours, and its log drives a progress bar.
Quantisation goes through llama-cpp-python's binding of `llama_model_quantize` (llama-quantize's code).
Nothing here maps tensor names: what llama.cpp can read is llama.cpp's call.

llama.cpp takes the chat template, the BOS/EOS/pad ids and whether BOS is added from the GGUF metadata, which
the converter reads from the HF dir's tokenizer files. So the export writes the trained tokenizer's values
there before converting, and reads them back from every file it wrote.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from tunesmith.config import GenerateConfig, UserError, load_config

CONVERTER = "convert_hf_to_gguf.py"
FLOAT_TYPES = ("f32", "f16", "bf16")  # written by the converter itself; the rest by llama_model_quantize
_TENSOR_LINE = re.compile(r" --> \w+, shape = \{")  # one per tensor written by the converter
_QUANT_STEP = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")  # llama_model_quantize: "[  12/ 272] blk.1.attn_q..."
_UNSUPPORTED = re.compile(r"Model (\S+) is not supported|Architecture '([^']+)' not supported")
_PRE_TOKENIZER = "BPE pre-tokenizer was not recognized"
# The converter runs as is, with one shim: transformers 5 folds GPT-NeoX's `rotary_pct` into rope_parameters
# and drops the key from the config dict, which the 0.3.36 GPT-NeoX converter still reads
# (hparams["rotary_pct"], a KeyError otherwise); put it back in the dict the converter gets from AutoConfig.
_LAUNCH = """
import runpy, sys
from transformers import GPTNeoXConfig
_to_dict = GPTNeoXConfig.to_dict
def to_dict(self):
    d = _to_dict(self)
    d.setdefault("rotary_pct", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 0.25))
    return d
GPTNeoXConfig.to_dict = to_dict
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter_dir() -> Path:
    """Where llama.cpp's converter lives: $TUNESMITH_LLAMA_CPP, else <sys.prefix>/share/llama.cpp."""
    env = os.environ.get("TUNESMITH_LLAMA_CPP")
    d = Path(env).expanduser() if env else Path(sys.prefix) / "share" / "llama.cpp"
    if not (d / CONVERTER).is_file() or not (d / "gguf-py").is_dir():
        raise UserError(
            f"{d}: llama.cpp's converter ({CONVERTER} and gguf-py/) is not there "
            "(`make` installs it with llama-cpp-python; or set TUNESMITH_LLAMA_CPP to a llama.cpp checkout)"
        )
    return d


def _converter_version(d: Path) -> str:
    return (d / "VERSION").read_text().strip() if (d / "VERSION").is_file() else "unknown version"


def convert_to_gguf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Run llama.cpp's converter on a plain HF model dir: one GGUF at `out` (f32, f16 or bf16)."""
    if outtype not in FLOAT_TYPES:
        raise UserError(
            f"--quant {outtype}: the converter writes {', '.join(FLOAT_TYPES)}; quantize the rest"
        )
    conv = converter_dir()
    # its own gguf-py first (the converter and its gguf package are released together), then its conversion/
    parts = (str(conv / "gguf-py"), str(conv), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in parts if p), "HF_HUB_OFFLINE": "1"}
    env["PYTHONUNBUFFERED"] = "1"  # its log lines arrive as it writes tensors: they drive the bar
    args = [str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    cmd = [sys.executable, "-c", _LAUNCH, str(conv / CONVERTER), *args]
    tail: deque[str] = deque(maxlen=40)  # what a failure is explained with
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
    )
    try:
        with _Progress(f"converting to GGUF ({outtype})", _count_tensors(hf_dir)) as bar:
            for line in proc.stdout:  # type: ignore[union-attr]
                tail.append(line.rstrip())
                if _TENSOR_LINE.search(line):
                    bar.update(bar.done + 1)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0 or not out.is_file():
        raise _conversion_error(hf_dir, list(tail), rc, _converter_version(conv))
    return out


def _conversion_error(hf_dir: Path, tail: list[str], rc: int, version: str) -> Exception:
    """The converter's failure as one line for a user's cause, else the log's end (an internal error)."""
    text = "\n".join(tail)
    if m := _UNSUPPORTED.search(text):
        arch = m.group(1) or m.group(2)
        return UserError(
            f"{hf_dir}/config.json: llama.cpp's converter ({version}) does not support architecture {arch} "
            "(export the HF dir without --gguf and convert it with a llama.cpp that supports it)"
        )
    if _PRE_TOKENIZER in text:
        return UserError(
            f"{hf_dir}/tokenizer.json: llama.cpp's converter ({version}) does not recognise this tokenizer's "
            "pre-tokenizer (it knows the tokenizers of published model families: train from such a base "
            "model's tokenizer for a GGUF export)"
        )
    return RuntimeError(f"llama.cpp's converter failed on {hf_dir} (exit {rc}); its last lines:\n{text}")


def _count_tensors(hf_dir: Path) -> int | None:
    """Tensors in the HF dir's safetensors files (headers only): the converter writes about as many."""
    from safetensors import safe_open

    files = list(Path(hf_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            n += len(list(st.keys()))
    return n


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "GGUF quantisation needs llama-cpp-python (`make` builds it; or pip install llama-cpp-python)"
        ) from None
    return llama_cpp


def _ftype(quant: str) -> int:
    """llama.cpp's file type for a quant name: q4_k_m -> LLAMA_FTYPE_MOSTLY_Q4_K_M."""
    ftype = getattr(_llama_cpp(), f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if not isinstance(ftype, int) or quant in FLOAT_TYPES:
        raise UserError(
            f"--quant {quant}: not a llama.cpp quantisation (use one of {', '.join(FLOAT_TYPES)}, "
            "q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k, iq4_xs, ...)"
        )
    return ftype


def quantize(src: Path, out: Path, quant: str) -> Path:
    """`src` (an f32/f16/bf16 GGUF) quantised to `quant` (q8_0, q4_k_m, ...) at `out` by llama.cpp."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(quant)
    params.nthread = os.cpu_count() or 1
    tail: deque[str] = deque(maxlen=40)
    llama_cpp.llama_backend_init()
    with _Progress(f"quantizing to {quant}", None) as bar:

        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", "replace")
            tail.append(line.rstrip())
            if m := _QUANT_STEP.search(line):
                bar.update(int(m.group(1)), int(m.group(2)))

        callback = llama_cpp.llama_log_callback(on_log)  # kept referenced until the C call returns
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
        finally:
            # llama-cpp-python's own log handler (quiet unless verbose), as it installs it on import
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0 or not out.is_file():
        lines = "\n".join(line for line in tail if line)
        raise RuntimeError(f"llama_model_quantize {src} -> {quant} failed ({rc}); its last lines:\n{lines}")
    return out


class _Progress:
    """A rich bar on a terminal; on a pipe (CI, logs) a plain line at each quarter."""

    def __init__(self, what: str, total: int | None) -> None:
        self.what, self.total, self.done, self._said = what, total, 0, -1
        self._bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=False)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        else:
            print(f"{self.what} ...", file=sys.stderr, flush=True)
        return self

    def update(self, done: int, total: int | None = None) -> None:
        """`done` steps of `total` (or of the total given at the start)."""
        self.total = total or self.total
        self.done = done if self.total is None else min(done, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)
        elif self.total and (quarter := 4 * self.done // self.total) > self._said and quarter < 4:
            self._said = quarter
            print(f"{self.what}: {self.done}/{self.total} tensors", file=sys.stderr, flush=True)

    def __exit__(self, kind, value, tb) -> None:
        if self._bar is not None:
            if kind is None:
                self._bar.update(self._task, completed=self.total or self.done, total=self.total or self.done)
            self._bar.stop()
        elif kind is None:
            print(f"{self.what}: done", file=sys.stderr, flush=True)


# ---- metadata: what llama.cpp will apply, written into the HF dir and read back from the GGUF ----


def gguf_metadata(path: Path) -> dict[str, object]:
    """A GGUF's scalar and string metadata (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if field.types and field.types[0] != GGUFValueType.ARRAY and not name.startswith("GGUF.")
    }


def expected_metadata(tokenizer, chat_template: str) -> dict[str, object]:
    """The GGUF keys that must match the trained tokenizer for llama.cpp to prompt and stop as we do."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]  # what the tokenizer adds around text
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    expected: dict[str, object] = {
        "tokenizer.chat_template": chat_template,
        "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.add_bos_token": bos is not None and probe[:1] == [bos],
        "tokenizer.ggml.add_eos_token": eos is not None and probe[-1:] == [eos],
    }
    if bos is not None:  # a tokenizer without BOS: the id llama.cpp holds is never used (add_bos false)
        expected["tokenizer.ggml.bos_token_id"] = bos
    return expected


def check_metadata(path: Path, expected: dict[str, object]) -> None:
    """Raise when the written GGUF's metadata differs from `expected` (an export bug, not a user's)."""
    meta = gguf_metadata(path)
    # llama.cpp reads an absent add_bos/add_eos key as false for BPE vocabularies
    got = {k: meta.get(k, False if ".add_" in k else None) for k in expected}
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    if wrong:
        detail = "; ".join(
            f"{k}: {str(got)[:80]!r} != {str(want)[:80]!r}" for k, (got, want) in wrong.items()
        )
        raise RuntimeError(f"{path}: GGUF metadata differs from the trained tokenizer: {detail}")


def prepare_hf_dir(hf_dir: Path, tokenizer, chat_template: str) -> dict[str, object]:
    """Write what the converter reads (template, special ids, add_bos/eos) into `hf_dir`; the expected."""
    expected = expected_metadata(tokenizer, chat_template)
    tc_path = hf_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    tc["chat_template"] = chat_template  # the converter prefers this key over chat_template.jinja
    tc["add_bos_token"] = expected["tokenizer.ggml.add_bos_token"]
    tc["add_eos_token"] = expected["tokenizer.ggml.add_eos_token"]
    for typ in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{typ}_token")
        tc[f"{typ}_token"] = token
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (hf_dir / "chat_template.jinja").write_text(chat_template)
    # the converter resolves a special token's id from tokenizer.json's added tokens, then from config.json's
    # *_token_id: a pad token from the main vocabulary is found only there (it never reads generation_config)
    cfg = json.loads((hf_dir / "config.json").read_text())
    for typ in ("bos", "eos", "pad"):
        cfg[f"{typ}_token_id"] = getattr(tokenizer, f"{typ}_token_id")
    # transformers 5 moved GPT-NeoX's rotary_pct into rope_parameters; the 0.3.36 converter reads the old key
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("model_type") == "gpt_neox" and "rotary_pct" not in cfg and "partial_rotary_factor" in rope:
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return expected


# ---- the export: run dir -> merged HF dir -> GGUF files, Modelfile and README.md ----


def parse_quants(values: list[str]) -> list[str]:
    """--quant values (repeated or comma lists) -> lowercase names in order, no repeats; f16 when none."""
    names = [q.strip().lower() for v in values for q in v.split(",") if q.strip()]
    names = list(dict.fromkeys(names)) or ["f16"]
    for q in names:
        if q not in FLOAT_TYPES:
            _ftype(q)  # an unknown name fails now, before minutes of conversion
    return names


def model_name(path: Path) -> str:
    """The name GGUF files are given: the run's (runs/x -> x, runs/x/best -> x-best), file-name safe."""
    path = Path(path).resolve()
    if path.name in ("final", "best") and (path.parent / "config.yaml").is_file():
        name = path.parent.name + ("-best" if path.name == "best" else "")
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _run_dir(path: Path) -> Path | None:
    """The run a model dir belongs to (for its config.yaml): the dir itself or the parent of final/best."""
    if (path / "config.yaml").is_file():
        return path
    if path.name in ("final", "best") and (path.parent / "config.yaml").is_file():
        return path.parent
    return None


def export_gguf(run_or_model_dir: Path, out_dir: Path, quants: list[str]) -> list[Path]:
    """GGUF files `<model>-<quant>.gguf`, a Modelfile and README.md in `out_dir`; returns the paths written.

    Built in a temp dir beside `out_dir` and moved in file by file at the end: an interrupted export leaves
    `out_dir` as it was, and nothing else in it (an HF export, the user's files) is touched.
    """
    from tunesmith.model import gguf_template
    from tunesmith.model.export import export
    from tunesmith.model.load import load_tokenizer

    src, out_dir = Path(run_or_model_dir), Path(out_dir)
    quants = parse_quants(quants)
    converter_dir()  # fail before the merge when the converter is missing
    name, run = model_name(src), _run_dir(src)
    gen = load_config(run / "config.yaml").generate if run is not None else GenerateConfig()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.gguf-tmp-", dir=out_dir.parent))
    try:
        hf = export(src, tmp / "hf", merge=True)  # a copy of final/ (adapter merged): ours to edit
        tokenizer = load_tokenizer(_model_config(run, hf))
        template = _template(hf, run)
        expected = prepare_hf_dir(hf, tokenizer, gguf_template.jinja_template(template, tokenizer))
        floats = [q for q in quants if q in FLOAT_TYPES] or ["f16"]  # quantised from the first float file
        files = {q: tmp / f"{name}-{q}.gguf" for q in quants}
        base = convert_to_gguf(hf, files.get(floats[0], tmp / f"{name}-{floats[0]}.gguf"), floats[0])
        for q in quants:
            if q in FLOAT_TYPES and q != floats[0]:
                convert_to_gguf(hf, files[q], q)
            elif q not in FLOAT_TYPES:
                quantize(base, files[q], q)
        for f in files.values():
            check_metadata(f, expected)
        first = files[quants[0]].name
        (tmp / "Modelfile").write_text(gguf_template.ollama_modelfile(first, template, tokenizer, gen))
        names = [f.name for f in files.values()]  # the README adds the Modelfile itself
        (tmp / "README.md").write_text(gguf_template.export_readme(out_dir, names, name))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in [*files.values(), tmp / "Modelfile", tmp / "README.md"]:  # the text that names them last
            os.replace(f, out_dir / f.name)
            written.append(out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _model_config(run: Path | None, hf: Path):
    """The run's model section pointed at `hf` (the tokenizer is loaded as training loaded it)."""
    from tunesmith.config import ModelConfig

    base = load_config(run / "config.yaml").model if run is not None else ModelConfig()
    return base.model_copy(update={"name": str(hf)})


def _template(hf: Path, run: Path | None) -> dict:
    """The Template dict the model was trained with: tunesmith_template.json, else the run's data section."""
    from tunesmith.data.formats import get_template
    from tunesmith.model.load import TEMPLATE_FILE, load_template

    if (hf / TEMPLATE_FILE).is_file():
        stored = load_template(hf)
        return stored.get("template", stored)  # {"template": Template.to_dict(), "max_length", ...}
    if run is None:
        raise UserError(
            f"{hf}: no {TEMPLATE_FILE} and no run config.yaml to say which template the model was trained "
            "with (export a run dir, or its final/ or best/)"
        )
    data = load_config(run / "config.yaml").data
    return get_template(data.template, data.format).to_dict()
