"""tunesmith vs TRL's SFTTrainer (packing, padding-free, default padding) on SmolLM2-135M-Instruct, on CPU.

The real workload: the first 96 earnings-call pairs of examples/data/earnings_calls.jsonl x 2 epochs, the
model's chat template, loss on the answer and its end-of-turn tokens only, 100 held-out pairs. Every run is
its own process (fresh peak RSS), sides interleaved (A B C D A B C D ...) so drift in this shared machine's
speed hits every side alike. Both sides train on the very samples tunesmith renders (input_ids and labels,
handed to TRL as a pre-tokenized dataset), so the loss masks are identical by construction; each child
counts the loss tokens its collated batches carry and the parent asserts the counts are equal. (TRL's own
prompt-completion tokenization of the same pairs differs only where a pair is over max_length: tunesmith cuts
the prompt, TRL the end of the answer.) Same lr, cosine schedule without warmup, AdamW (weight decay 0, clip
1.0), seed, LoRA r32/alpha 64/all-linear/no dropout, no gradient checkpointing (TRL's default turns it on),
precision (fp32, or bf16 autocast where the CPU has native bf16). Tokens per optimizer step: tunesmith and
TRL packing take 8 rows of max_length packed samples; padding-free and padding take as many samples per step
as tunesmith's packed steps hold on average (the nearest whole number).

Measured: real (non-pad) tokens/s over the training steps only (model load, data and saving excluded), the
first --head steps separately (the slow start), peak RSS (the child's VmHWM, read before evaluation), and the
held-out loss of each side's saved adapter/model computed by one function (tunesmith.eval.loss) in the
child after training.

    python bench/train_vs_trl.py [--repeats 3] [--method lora|full] [--pairs 96] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("tunesmith", "trl-packing", "trl-padding-free", "trl-padding")
ROWS = 8  # packed rows of max_length per optimizer step (tunesmith and TRL packing)


def config(a: argparse.Namespace, out: Path):
    """The tunesmith Config both sides' data and hyperparameters come from."""
    from tunesmith.config import load_config

    over = [
        f"model.name={a.model}",
        "data.path=examples/data/earnings_calls.jsonl",
        "data.template=chat",
        f"data.max_length={a.max_length}",
        f"data.test_size={a.test}",
        f"data.limit={a.pairs}",
        f"out_dir={out}",
        f"train.epochs={a.epochs}",
        f"train.batch_size={ROWS}",
        f"train.lr={a.lr}",
        "train.scheduler=cosine",
        "train.log_every=1",
        f"train.precision={a.precision}",
    ]
    if a.method == "lora":
        over += ["lora.r=32", "lora.alpha=64", "lora.dropout=0.0"]
    return load_config(None, over)


def vm_hwm_gib() -> float:
    """This process's peak resident set (VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def packed_loss_tokens(samples: list[dict], epochs: int, max_length: int, pad_id: int) -> int:
    """Loss tokens of tunesmith's collated packed batches over all epochs (its loss's own target mask)."""
    from tunesmith.data.pack import collate, epoch_batches
    from tunesmith.model.loss import IGNORE, next_token_targets

    lengths, total = [len(s["input_ids"]) for s in samples], 0
    for epoch in range(epochs):
        for rows in epoch_batches(lengths, ROWS, max_length, True, seed=42, epoch=epoch):
            total += int((next_token_targets(collate(samples, rows, pad_id, True)) != IGNORE).sum())
    return total


def run_tunesmith(a: argparse.Namespace, out: Path) -> dict:
    """tunesmith's train(); per-step tokens and seconds from its metrics.jsonl (log_every=1)."""
    from tunesmith.data.pipeline import build
    from tunesmith.model.load import load_tokenizer
    from tunesmith.train.loop import train

    cfg = config(a, out)
    tok = load_tokenizer(cfg.model)
    samples = build(cfg, tok, None).train
    before = vm_hwm_gib()  # train() resets VmHWM before its model loads (runtime.reset_peak_rss): keep this
    result = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps, prev = [], 0
    for r in (r for r in rows if r.get("split") == "train"):
        real = r["tokens"] - prev
        steps.append((real, real / r["tokens_per_s"]))
        prev = r["tokens"]
    assert prev == result["tokens"], (prev, result["tokens"])
    return {
        "steps": steps,
        "rss": max(before, vm_hwm_gib()),
        "loss_tokens": packed_loss_tokens(samples, a.epochs, a.max_length, tok.pad_token_id),
        "saved": str(out / "final"),
    }


def trl_batch_counts(inputs: dict) -> tuple[int, int]:
    """(real tokens, loss tokens) of one TRL batch; the HF loss scores labels[:, 1:] (shifted)."""
    # padded batches carry an attention mask; packed and padding-free ones are (1, N) rows without pads
    mask = inputs.get("attention_mask")
    real = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    return real, int((inputs["labels"][:, 1:] != -100).sum())


def trl_trainer(a: argparse.Namespace, out: Path, side: str, per_step: int, samples: list[dict], tok, model):
    """A TRL SFTTrainer for `side` on tunesmith's rendered `samples` (pre-tokenized: input_ids and labels).

    It counts the real and loss tokens of each batch it trains on (trainer.counts) and the clock and real
    tokens at each optimizer step's end (trainer.marks).
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.runtime import autocast_dtype

    class Counting(SFTTrainer):
        counts = {"real": 0, "loss": 0}
        marks: list[tuple[float, int]] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            real, loss = trl_batch_counts(inputs)
            self.counts["real"] += real
            self.counts["loss"] += loss
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            Counting.marks.append((time.perf_counter(), 0))

        def on_step_end(self, args, state, control, **kw):
            Counting.marks.append((time.perf_counter(), Counting.counts["real"]))

    args = SFTConfig(
        output_dir=str(out),
        # padding-free without packing refuses a max_length; tunesmith's samples are already cut to it
        max_length=None if side == "trl-padding-free" else a.max_length,
        packing=side == "trl-packing",
        padding_free=side == "trl-padding-free",
        per_device_train_batch_size=ROWS if side == "trl-packing" else per_step,
        num_train_epochs=a.epochs,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # tunesmith's AdamW is fused on CPU too
        gradient_checkpointing=False,  # TRL's default is on; tunesmith's off
        bf16=autocast_dtype(a.precision, torch.device("cpu")) is not None,  # TRL's default is on
        use_cpu=True,
        seed=42,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    peft = None
    if a.method == "lora":
        from peft import LoraConfig

        peft = LoraConfig(
            r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    data = Dataset.from_list([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
    return Counting(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft,
        callbacks=[Clock()],
    )


def run_trl(a: argparse.Namespace, out: Path, side: str, per_step: int) -> dict:
    """TRL SFTTrainer on tunesmith's rendered samples: per-step real tokens and seconds, loss tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.data.pipeline import build
    from tunesmith.model.load import load_tokenizer

    cfg = config(a, out)
    tok = load_tokenizer(cfg.model)
    samples = build(cfg, tok, None).train
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    trainer = trl_trainer(a, out, side, per_step, samples, tok, model)
    trainer.train()
    rss = vm_hwm_gib()
    trainer.save_model(str(out / "final"))
    marks = trainer.marks
    steps = [(n1 - n0, t1 - t0) for (t0, n0), (t1, n1) in zip(marks, marks[1:])]
    return {"steps": steps, "rss": rss, "loss_tokens": trainer.counts["loss"], "saved": str(out / "final")}


def held_out_loss(a: argparse.Namespace, out: Path, saved: str) -> float:
    """Token-mean held-out loss of the saved adapter/model, by tunesmith's eval (the same for both sides)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.data.pipeline import build
    from tunesmith.eval.loss import evaluate_loss
    from tunesmith.model.load import load_tokenizer
    from tunesmith.runtime import autocast_dtype

    cfg = config(a, out)
    tok = load_tokenizer(cfg.model)
    test = build(cfg, tok, None).test
    if a.method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, saved)
    else:
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    dev = torch.device("cpu")
    amp = autocast_dtype(a.precision, dev)
    return evaluate_loss(model, test, 8, a.max_length, tok.pad_token_id, False, dev, amp)["loss"]


def child(a: argparse.Namespace) -> None:
    """One run of one side; prints RESULT {json}."""
    out = Path(a.work) / f"{a.child}-{a.run}"
    if a.child == "tunesmith":
        r = run_tunesmith(a, out)
    else:
        r = run_trl(a, out, a.child, a.per_step)
    r["eval_loss"] = held_out_loss(a, out, r.pop("saved"))
    print("RESULT " + json.dumps(r))


def tiny_model(path: Path, tokenizer_dir: str) -> None:
    """--quick: a 2-layer Llama with SmolLM2's tokenizer and chat template (the real masks, a toy model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def samples_per_step(a: argparse.Namespace, work: Path) -> tuple[int, float]:
    """Samples per step for the unpacked sides: tunesmith's packed steps' samples on average; and the mean."""
    from tunesmith.data.pack import epoch_batches
    from tunesmith.data.pipeline import build
    from tunesmith.model.load import load_tokenizer

    cfg = config(a, work / "plan")
    samples = build(cfg, load_tokenizer(cfg.model), None).train
    lengths = [len(s["input_ids"]) for s in samples]
    steps = len(epoch_batches(lengths, ROWS, a.max_length, True, seed=42, epoch=0))
    return max(1, round(len(samples) / steps)), sum(lengths) / len(lengths) * len(samples) / steps


def summarise(r: dict, head: int) -> dict:
    """Real tokens/s over all steps, over the first `head` steps, and over the rest."""
    steps = r["steps"]

    def rate(part):
        return sum(n for n, _ in part) / max(sum(s for _, s in part), 1e-9) if part else float("nan")

    return {
        "all": rate(steps),
        "head": rate(steps[:head]),
        "rest": rate(steps[head:]),
        "steps": len(steps),
        "tokens": sum(n for n, _ in steps),
        **{k: r[k] for k in ("rss", "eval_loss", "loss_tokens")},
    }


def spread(xs: list[float], fmt: str = "{:.0f}") -> str:
    """'median [min-max]'."""
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def report(runs: dict[str, list[dict]], a: argparse.Namespace) -> None:
    """The table: medians and spreads per side, ratios vs TRL's fastest side (by median tokens/s)."""
    med = {
        s: {k: statistics.median(r[k] for r in rs) for k in ("all", "rss", "eval_loss")}
        for s, rs in runs.items()
    }
    trl = [s for s in runs if s.startswith("trl")]
    best = max(trl, key=lambda s: med[s]["all"]) if trl else None
    print(
        f"\n{'side':<18}{'real tok/s':>18}{f'first {a.head} steps':>16}{'after':>14}{'peak RSS GiB':>20}"
        f"{'eval loss':>11}{'steps':>6}{'x tok/s':>8}{'x RSS':>7}"
    )
    for s, rs in runs.items():
        ratio = (med[s]["all"] / med[best]["all"], med[s]["rss"] / med[best]["rss"]) if best else (1, 1)
        print(
            f"{s:<18}{spread([r['all'] for r in rs]):>18}{spread([r['head'] for r in rs]):>16}"
            f"{spread([r['rest'] for r in rs]):>14}{spread([r['rss'] for r in rs], '{:.2f}'):>20}"
            f"{med[s]['eval_loss']:>11.4f}{rs[0]['steps']:>6}{ratio[0]:>8.2f}{ratio[1]:>7.2f}"
        )
    if best:
        print(f"ratios vs TRL's fastest side here: {best}")


def run_child(a: argparse.Namespace, side: str, k: int, per_step: int, env: dict) -> dict:
    """One side's run `k` in a fresh process; its RESULT line."""
    cmd = [sys.executable, __file__, "--child", side, "--run", str(k), "--per-step", str(per_step)]
    cmd += [f"--{x.replace('_', '-')}={getattr(a, x)}" for x in CHILD_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{side} run {k} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[0][7:])


CHILD_ARGS = ("model", "work", "method", "pairs", "epochs", "test", "max_length", "lr", "precision")


def parse() -> argparse.Namespace:
    """Command line (the parent's and the children's)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--test", type=int, default=100, help="held-out pairs")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 for LoRA, 1e-4 for full")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads per run (default: all cores)")
    ap.add_argument("--head", type=int, default=10, help="first steps reported apart (the slow start)")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, 16 pairs, 16 held out, 1 repeat")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--per-step", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.lr = a.lr or (1e-3 if a.method == "lora" else 1e-4)
    return a


def main() -> None:
    a = parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.child:
        return child(a)
    import torch

    from tunesmith.model.resolve import resolve
    from tunesmith.plan.history import cpu_name
    from tunesmith.runtime import autocast_dtype

    work = Path(a.work or tempfile.mkdtemp(prefix="tunesmith-vs-trl-"))
    a.work, a.model = str(work), resolve("smollm2-135m-instruct")
    if a.quick:
        tiny_model(work / "tiny", a.model)
        a.model, a.pairs, a.test, a.repeats = str(work / "tiny"), 16, 16, 1
    per_step, tokens_per_step = samples_per_step(a, work)
    threads = str(a.threads or os.cpu_count())
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    amp = autocast_dtype(a.precision, torch.device("cpu"))
    print(
        f"CPU: {cpu_name()}, {threads} threads, load {os.getloadavg()[0]:.1f}; precision "
        f"{'bf16 autocast' if amp else 'fp32'}; {a.method}, {a.pairs} pairs x {a.epochs} epochs, lr {a.lr}; "
        f"{ROWS} packed rows of {a.max_length} (~{tokens_per_step:.0f} real tokens) per step, unpacked sides "
        f"{per_step} samples per step; work {work}",
        flush=True,
    )
    sides = a.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for k in range(a.repeats):
        for side in sides:
            r = summarise(run_child(a, side, k, per_step, env), a.head)
            runs[side].append(r)
            print(f"  {side} run {k}: {json.dumps({x: round(v, 4) for x, v in r.items()})}", flush=True)
    counts = {s: {r["loss_tokens"] for r in rs} for s, rs in runs.items()}
    assert len(set().union(*counts.values())) == 1, f"loss-token counts differ: {counts}"
    print(f"loss tokens, every side and run: {next(iter(counts.values())).pop()}")
    report(runs, a)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
