"""Everything before the first training step, in the order it must happen; `prepare(cfg) -> Run` for the loop.

Order matters and is kept here: the data is built and pre-flight checked before the run guard looks at the
run dir; the run guard (resume/overwrite checks, moving an earlier run aside) runs before any weight loads;
the optimizer and schedule exist before a checkpoint restores them. train.time_budget: the warm-up runs once
the model and optimizer exist, and its sizing (steps, and the pairs of data.limit=auto) comes before the
stream and the schedule are made (train/budget.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import Config, UserError, save_config
from tunesmith.data.pack import EpochStream
from tunesmith.data.pipeline import Prepared, build, build_heldout, tokenizer_hash
from tunesmith.data.stream import TextStream
from tunesmith.model.load import load_model, load_tokenizer, pad_id
from tunesmith.model.lora import apply_lora, trainable_summary
from tunesmith.runtime import (
    Dist,
    autocast_dtype,
    device,
    dist_info,
    huge_pages_for_tensors,
    print0,
    reset_peak_rss,
    seed_everything,
)
from tunesmith.train import budget, checkpoint, distributed
from tunesmith.train.log import rewind
from tunesmith.train.optim import make_optimizer, make_scheduler, total_steps
from tunesmith.train.preflight import check
from tunesmith.train.record import (
    begin_segment,
    check_fresh,
    check_resume,
    fingerprint,
    hardware,
    move_aside,
    recorded_fingerprint,
)
from tunesmith.train.run_plan import start_plan


@dataclass
class Run:
    """What the training loop needs, made by `prepare`: the run's parts, no behaviour of its own."""

    cfg: Config
    dir: Path
    dist: Dist
    dev: torch.device
    tok: object  # the tokenizer (saved with the final model)
    data: Prepared
    model: torch.nn.Module  # wrapped for DDP/FSDP under torchrun: forward and backward go through it
    core: torch.nn.Module  # the unwrapped model: clipping, checkpoints, export
    stream: EpochStream | TextStream
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # loss scaling for fp16 autocast; disabled (every call a no-op) otherwise
    amp: torch.dtype | None  # autocast dtype, None for fp32
    total: int  # optimizer steps of the whole run
    start: int  # first step of this segment (> 0 when resumed)
    tokens: int  # real (non-pad) tokens trained on before `start`
    select: dict | None  # the best-checkpoint selection a resumed checkpoint saved (train/select.py)
    micro_per_step: int  # micro-batches of one optimizer step over all ranks
    pad_id: int
    fingerprint: dict  # what this segment trains under (record.fingerprint), stored in each checkpoint
    plan: dict  # the planner's prediction for this run (MFU needs its FLOPs per token)
    eval_every: int  # train.eval_every in steps ('epoch' resolved for this run's data; 0: only the last)
    budget: dict | None  # train.time_budget's sizing (budget.json), None when the run was not sized
    guard: budget.Guard | None  # the hard stop, None without train.time_budget
    before_model: int | None  # process RSS before the model loaded: CPU peak memory is measured above it
    t0: float  # wall clock at the start


def prepare(cfg: Config) -> Run:
    """Set up a run: data, pre-flight, run guard, model (+LoRA), optimizer, schedule, scaler, resume, plan."""
    # before any large tensor: a step re-allocates hundreds of MB (see its docstring)
    huge_pages_for_tensors()
    d = dist_info()
    dev = device(d)
    distributed.init(d, dev)
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    t0 = time.time()

    tok = load_tokenizer(cfg.model)
    # A streamed corpus is never held in memory: only the held-out file (data.test_path) is rendered.
    # data.limit=auto: the whole pool; the sizing below takes the pairs that fit
    out = run if d.is_main else None
    data = build_heldout(cfg, tok, out) if cfg.data.streaming else build(cfg, tok, out, auto="pool")
    check(cfg, tok, data)  # before any weight moves: one line per warning, the first problem as a UserError
    if cfg.train.fsdp and d.world > 1 and autocast_dtype(cfg.train.precision, dev) == torch.float16:
        # measured (torch 2.13, gloo): GradScaler fails on FSDP2's sharded gradients, ShardedGradScaler leaves
        # them scaled (grad norm x 65536), so fp16 there would clip and report silently wrong gradients
        raise UserError(
            "train.precision=fp16 with train.fsdp=true: loss scaling does not work on FSDP2's sharded "
            "gradients (use train.precision=bf16, or DDP: train.fsdp=false)"
        )
    ckpt, fp, changed = _open_run(cfg, run, data, tok, d)
    before_model = reset_peak_rss()  # CPU: what the process holds before the model, off the measured peak
    model = _load_model(cfg, dev)

    tc = cfg.train
    micro_per_step = tc.grad_accum * d.world
    opt = make_optimizer(model, tc, dev)
    amp = autocast_dtype(tc.precision, dev)
    sizing, data = budget.size_run(cfg, run, ckpt, data, model, opt, amp, pad_id(tok), d, t0)
    stream, total = _stream(cfg, data, tok, d, run, micro_per_step)
    total = sizing["steps"] if sizing else total  # fewer steps fit: warmup and schedule over those
    eval_every = _eval_every(cfg, stream, micro_per_step)  # after the sizing: 'epoch' of the pairs trained
    if sizing and cfg.train.eval_every == "epoch":
        eval_every = sizing["eval_every"]  # the sizing may evaluate every k-th pass (plan/budget.EVAL_SHARE)
    sched = make_scheduler(opt, tc, total)
    # fp16's 5 exponent bits flush small gradients to zero: scale the loss up, unscale before clipping.
    # Disabled (every call a no-op) for the other precisions; DDP's all-reduced gradients agree on infs.
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    start, tokens, selection = _resume(ckpt, model, opt, sched, scaler, stream)

    if d.is_main:
        begin_segment(
            run,
            fp,
            start,
            ckpt,
            changed,
            model=cfg.model.name,
            lora=cfg.lora is not None,
            seed=tc.seed,
            data_hash=data.data_hash,
            template_hash=data.template_hash,
            tokenizer_hash=fp["tokenizer_hash"],
            train_examples=len(data.train),
            test_examples=len(data.test),
            rejected_rows=data.rejected,
            hardware=hardware(dev, d.world),
        )
        if ckpt is not None and rewind(run / "metrics.jsonl", start):
            print0(
                f"note: metrics logged after step {start} (redone now) moved to "
                f"{run / 'metrics.rewound.jsonl'}"
            )
        if ckpt is not None and (moved_best := checkpoint.rewind_best(run, start)) is not None:
            print0(f"note: best/ was kept after step {start} (redone now); it is now {moved_best}")
    plan = start_plan(cfg, run, data.train, total, micro_per_step, d.is_main, sizing)
    wrapped = distributed.wrap(model, d, dev, tc.fsdp)
    return Run(
        cfg=cfg,
        dir=run,
        dist=d,
        dev=dev,
        tok=tok,
        data=data,
        model=wrapped,
        core=distributed.unwrap(wrapped),
        stream=stream,
        opt=opt,
        sched=sched,
        scaler=scaler,
        amp=amp,
        total=total,
        start=start,
        tokens=tokens,
        select=selection,
        micro_per_step=micro_per_step,
        pad_id=pad_id(tok),
        fingerprint=fp,
        plan=plan,
        eval_every=eval_every,
        budget=sizing,
        guard=budget.guard(cfg, sizing, t0, total),
        before_model=before_model,
        t0=t0,
    )


def _open_run(cfg: Config, run: Path, data: Prepared, tok, d: Dist) -> tuple[Path | None, dict, list[dict]]:
    """The verified checkpoint to resume from, this segment's fingerprint and the changes the user allowed.

    Refuses a resume that would silently continue a different training (data, template, tokenizer, model or an
    optimisation setting changed), and a fresh run over a finished run of another config; the files of an
    earlier run in out_dir are moved aside, never deleted. Only then is config.yaml (re)written.
    """
    tc = cfg.train
    hashes = {
        "data_hash": data.data_hash,
        "template_hash": data.template_hash,
        "tokenizer_hash": tokenizer_hash(tok),
    }
    fp = fingerprint(cfg.model_dump(mode="json"), d.world, hashes)
    ckpt = checkpoint.find_resume(tc.resume, run)
    source = ckpt.parent.parent if ckpt is not None else None  # <run>/checkpoints/step-N
    changed = []
    if source is not None:
        old = recorded_fingerprint(source, checkpoint.fingerprint_of(ckpt))
        changed = check_resume(run, fp, old, tc.resume_changed == "allow")
    fresh_dir = source is None or source.resolve() != run.resolve()
    if fresh_dir:
        check_fresh(run, fp, tc.overwrite)
    distributed.barrier(d)  # every rank has read the old run before rank 0 moves it aside
    if d.is_main:
        moved = move_aside(run) if fresh_dir else None
        if moved is not None:
            print0(f"note: {run} held an earlier run; its files are now in {moved}")
        if changed:
            print0(
                f"warning: resuming although {', '.join(c['key'] for c in changed)} changed "
                "(train.resume_changed=allow; recorded in manifest.json)"
            )
        save_config(cfg, run / "config.yaml")
    return ckpt, fp, changed


def _load_model(cfg: Config, dev: torch.device) -> torch.nn.Module:
    """The base model on `dev`, with LoRA adapters when cfg.lora is set, in training mode; prints its size."""
    model = load_model(cfg.model, dev, quantize=cfg.lora.quantize if cfg.lora else None)
    if cfg.lora:
        model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    trainable, total_params = trainable_summary(model)
    print0(
        f"model: {total_params:,} params, {trainable:,} trainable "
        f"({'LoRA' if cfg.lora else 'full'}) on {dev.type}"
    )
    return model


def _stream(
    cfg: Config, data: Prepared, tok, d: Dist, run: Path, micro_per_step: int
) -> tuple[EpochStream | TextStream, int]:
    """The micro-batch stream (a streamed corpus or the rendered samples) and the run's optimizer steps."""
    tc = cfg.train
    if cfg.data.streaming:
        stream = TextStream(
            cfg.data, tok, tc.batch_size, tc.seed, d.rank, d.world, out_dir=run if d.is_main else None
        )
        return (
            stream,
            tc.max_steps or stream.batches_per_epoch,
        )  # the latter raises: a stream has no epochs to count
    stream = EpochStream(
        data.train, tc.batch_size, cfg.data.max_length, cfg.data.packing, tc.seed, pad_id(tok)
    )
    return stream, total_steps(tc, stream.batches_per_epoch, micro_per_step)


def _eval_every(cfg: Config, stream: EpochStream | TextStream, micro_per_step: int) -> int:
    """train.eval_every in steps: 'epoch' is one pass over this run's data (pre-flight refuses it for a
    streamed corpus)."""
    if cfg.train.eval_every != "epoch":
        return cfg.train.eval_every
    return budget.eval_period("epoch", stream.batches_per_epoch, micro_per_step)


def _resume(ckpt: Path | None, model, opt, sched, scaler, stream) -> tuple[int, int, dict | None]:
    """Restore weights, optimizer, schedule, loss scale, RNG and data cursor; (first step, real tokens seen
    before it, the best-checkpoint selection saved with it)."""
    if ckpt is None:
        return 0, 0, None
    cursor = checkpoint.load(ckpt, model, opt, sched, scaler)
    stream.load_state(cursor)
    shown = {k: v for k, v in cursor.items() if k not in ("step", "tokens", "select")}
    print0(f"resumed from {ckpt} at step {cursor['step']} (data cursor {json.dumps(shown)[:200]})")
    # checkpoints of older tunesmith have no count: the run's token total then starts over from this segment
    return cursor["step"], int(cursor.get("tokens", 0)), cursor.get("select")
