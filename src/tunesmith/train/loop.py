"""The training loop: one function, top to bottom in the order it runs. Full fine-tuning and LoRA alike.

LoRA changes only which parameters train (apply_lora), what a checkpoint holds (trainable tensors) and
whether export merges. Loss is normalised by the label tokens of the whole accumulated (and, under DDP,
global) batch, so batch_size=2 x grad_accum=4 is the same update as batch_size=8 x grad_accum=1.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import Config, save_config
from tunesmith.data.pack import EpochStream
from tunesmith.data.pipeline import Prepared, build, build_heldout, tokenizer_hash
from tunesmith.data.render import IGNORE
from tunesmith.data.stream import TextStream
from tunesmith.eval.loss import evaluate_loss, loss_sum, next_token_targets
from tunesmith.model.export import save_final
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.model.lora import apply_lora, trainable_summary
from tunesmith.runtime import (
    Dist,
    autocast,
    autocast_dtype,
    device,
    dist_info,
    huge_pages_for_tensors,
    print0,
    seed_everything,
)
from tunesmith.train import checkpoint, distributed
from tunesmith.train.log import (
    MetricsLog,
    plot_losses,
    progress_bar,
    read_metrics,
    rewind,
    tensorboard_writer,
)
from tunesmith.train.optim import make_optimizer, make_scheduler
from tunesmith.train.plan_io import finish_plan, mfu, reset_peak_rss, start_plan, total_steps
from tunesmith.train.preflight import check
from tunesmith.train.record import (
    begin_segment,
    check_fresh,
    check_resume,
    end_segment,
    fingerprint,
    hardware,
    move_aside,
    recorded_fingerprint,
)


def _epoch(stream) -> float:
    """Fractional epoch for the log (a text stream reports its own whole-epoch count)."""
    if isinstance(stream, EpochStream):
        return stream.epoch + stream.index / max(1, stream.batches_per_epoch)
    return stream.epoch


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf: the run stops (exit 1) before the update; the last good checkpoint is kept."""


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints at the end of the current step and exits."""

    signum: int = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum


@contextmanager
def _stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set the flag instead of killing the process; the old handlers return however the loop ends."""
    stop = StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _open_run(cfg: Config, run: Path, data: Prepared, tok, d: Dist) -> tuple[Path | None, dict, list[dict]]:
    """The verified checkpoint to resume from, this segment's fingerprint and the changes the user allowed.

    Refuses a resume that would silently continue a different training (data, template, tokenizer, model or an
    optimisation setting changed), and a fresh run over a finished run of another config; the files of an
    earlier run in out_dir are moved aside, never deleted. Only then is config.yaml (re)written.
    """
    tc = cfg.train
    hashes = {"data_hash": data.data_hash, "template_hash": data.template_hash, "tokenizer_hash": tokenizer_hash(tok)}
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
            print0(f"warning: resuming although {', '.join(c['key'] for c in changed)} changed (train.resume_changed=allow; "
                   "recorded in manifest.json)")
        save_config(cfg, run / "config.yaml")
    return ckpt, fp, changed


def _grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Total gradient norm, clipping to max_norm when set; always computed, since a finite loss can come with
    inf/NaN gradients that would poison the weights silently."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm
            else torch.nn.utils.get_total_norm([p.grad for p in params]))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def _diverged(loss: torch.Tensor, grad_norm: torch.Tensor, step: int, wheres: list[str], lr: float, run: Path) -> str | None:
    """None while loss and gradient norm are finite (one device sync for both), else the one-line reason."""
    loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]).tolist()
    if math.isfinite(loss_v) and math.isfinite(norm_v):
        return None
    batch = ", ".join(wheres[:4]) + (" ..." if len(wheres) > 4 else "")
    if not math.isfinite(loss_v):
        head = f"loss is {loss_v} at step {step} (batch with {batch})"
    else:
        head = f"gradient norm is {norm_v} at step {step} (loss {loss_v:.4g}, batch with {batch})"
    # before this step (a corrupt later one skipped on resume may still sit there until it is re-saved)
    kept = [c for c in checkpoint.checkpoints(run) if int(c.name.split("-")[1]) < step]
    kept_msg = f"last good checkpoint {kept[-1]} kept" if kept else "no checkpoint saved yet (train.save_every)"
    return (f"{head}; stopped before the update, {kept_msg}, no final/ written "
            f"(usual causes: train.lr too high (now {lr:g}), train.precision=fp16 without loss scaling (use bf16 or "
            "fp32), bad labels in that batch; after a fix continue with train.resume=auto train.resume_changed=allow)")


def _gather(stream, micro_per_step: int, d: Dist, dev: torch.device) -> tuple[list[dict], list[str], int, int]:
    """This rank's micro-batches of one global step, their rows' places, and the global label and real-token counts.

    The counts come from the host-side batches before any copy to the device, so a single-process step
    never waits on the device for them; under torchrun one all-reduce sums them over ranks.
    """
    mine, wheres = [], []
    for k in range(micro_per_step):
        batch, w = stream.next()
        if k % d.world == d.rank:
            mine.append(batch)
            wheres += w
    counts = torch.tensor([sum(int((next_token_targets(b) != IGNORE).sum()) for b in mine),
                           sum(int(b["real_tokens"]) for b in mine)])
    if d.world > 1:
        counts = distributed.all_reduce_sum(counts.to(dev), d).cpu()
    return mine, wheres, max(1, int(counts[0])), int(counts[1])


def _forward_backward(model, mine: list[dict], n_labels: int, world: int, amp: torch.dtype | None,
                      dev: torch.device, smoothing: float) -> torch.Tensor:
    """Backward of (sum of token losses / global label count) for each micro-batch; returns the summed loss.

    DDP averages gradients over ranks, so each rank scales by `world` to keep the update the mean over all
    label tokens of the global batch.
    """
    step_loss = torch.zeros((), device=dev)
    for i, batch in enumerate(mine):
        batch = {key: v.to(dev, non_blocking=True) for key, v in batch.items()}
        # DDP: all-reduce gradients only on the last micro-batch of the step
        last = i == len(mine) - 1 or not hasattr(model, "no_sync")
        with model.no_sync() if not last else nullcontext(), autocast(amp, dev):
            s, _ = loss_sum(model, batch, smoothing)
            (s * world / n_labels).backward()
        step_loss += s.detach()
    return step_loss


def train(cfg: Config) -> dict:
    """Fine-tune `cfg.model` on `cfg.data`; returns final metrics and the run dir (also the CLI's `train`)."""
    huge_pages_for_tensors()  # before any large tensor: a step re-allocates hundreds of MB (see its docstring)
    d = dist_info()
    dev = device(d)
    distributed.init(d, dev)
    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    t0 = time.time()

    # ---- data and model
    tok = load_tokenizer(cfg.model)
    # A streamed corpus is never held in memory: only the held-out file (data.test_path) is rendered.
    data = (build_heldout if cfg.data.streaming else build)(cfg, tok, run if d.is_main else None)
    check(cfg, tok, data)  # before any weight moves: one line per warning, the first problem as a UserError
    ckpt, fp, changed = _open_run(cfg, run, data, tok, d)
    quantize = cfg.lora.quantize if cfg.lora else None
    before_model = reset_peak_rss()  # CPU: what the process holds before the model, off the measured peak
    model = load_model(cfg.model, dev, quantize=quantize)
    if cfg.lora:
        model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    trainable, total_params = trainable_summary(model)
    print0(f"model: {total_params:,} params, {trainable:,} trainable ({'LoRA' if cfg.lora else 'full'}) on {dev.type}")

    # ---- steps, optimizer, schedule
    tc = cfg.train
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    micro_per_step = tc.grad_accum * d.world
    if cfg.data.streaming:
        stream = TextStream(cfg.data, tok, tc.batch_size, tc.seed, d.rank, d.world, out_dir=run if d.is_main else None)
        total = tc.max_steps or stream.batches_per_epoch  # the latter raises: a stream has no epochs to count
    else:
        stream = EpochStream(data.train, tc.batch_size, cfg.data.max_length, cfg.data.packing, tc.seed, pad_id)
        total = total_steps(tc, stream.batches_per_epoch, micro_per_step)
    opt = make_optimizer(model, tc, dev)
    sched = make_scheduler(opt, tc, total)
    amp = autocast_dtype(tc.precision, dev)

    start = 0
    if ckpt is not None:
        cursor = checkpoint.load(ckpt, model, opt, sched)
        stream.load_state(cursor)
        start = cursor["step"]
        print0(f"resumed from {ckpt} at step {start} (data cursor {json.dumps({k: v for k, v in cursor.items() if k != 'step'})[:200]})")

    if d.is_main:
        begin_segment(run, fp, start, ckpt, changed, model=cfg.model.name, lora=cfg.lora is not None, seed=tc.seed,
                      data_hash=data.data_hash, template_hash=data.template_hash, tokenizer_hash=fp["tokenizer_hash"],
                      train_examples=len(data.train), test_examples=len(data.test), rejected_rows=data.rejected,
                      hardware=hardware(dev, d.world))
        if ckpt is not None and rewind(run / "metrics.jsonl", start):
            print0(f"note: metrics logged after step {start} (redone now) moved to {run / 'metrics.rewound.jsonl'}")
    plan = start_plan(cfg, run, data.train, total, micro_per_step, d.is_main)

    model = distributed.wrap(model, d, dev, tc.fsdp)
    core = distributed.unwrap(model)
    log = MetricsLog(run / "metrics.jsonl", tensorboard_writer(run, tc.tensorboard and d.is_main), enabled=d.is_main)
    done = start
    last_eval: dict = {}
    last_loss: float | None = None
    tokens_seen, t_train, window_tokens, t_window = 0, 0.0, 0, time.time()

    with _stop_on_signals() as stop, progress_bar(d.is_main) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"), lr=sched.get_last_lr()[0], tps=0.0)
        for step in range(start, total):
            t_step = time.time()
            # (1) this rank's micro-batches of the global step, (2) forward/backward of each
            mine, wheres, n_labels, real = _gather(stream, micro_per_step, d, dev)
            step_loss = _forward_backward(model, mine, n_labels, d.world, amp, dev, tc.label_smoothing)
            step_loss = distributed.all_reduce_sum(step_loss, d) / n_labels
            # (3) clip; a NaN/inf loss or gradient stops the run before it reaches the weights; step, schedule
            grad_norm = _grad_norm(core, tc.max_grad_norm)
            lr = sched.get_last_lr()[0]
            reason = _diverged(step_loss, grad_norm, step + 1, wheres, lr, run)
            if reason is not None:
                if d.is_main:
                    end_segment(run, step, "diverged")
                raise TrainingDiverged(reason)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            # (4) log: real (non-pad) tokens per second and MFU from the planner's FLOPs per token
            tokens_seen += real
            window_tokens += real
            t_train += time.time() - t_step
            done = step + 1
            if done % tc.log_every == 0 or done == total:
                tps = window_tokens / max(time.time() - t_window, 1e-9)
                row = {"step": done, "split": "train", "loss": step_loss.item(), "lr": lr, "tokens": tokens_seen,
                       "tokens_per_s": tps, "epoch": _epoch(stream), "grad_norm": float(grad_norm), "mfu": mfu(plan, tps)}
                log.write(row)
                last_loss = row["loss"]
                window_tokens, t_window = 0, time.time()
                bar.update(task, loss=row["loss"], tps=tps)
            bar.update(task, completed=done, lr=lr)

            # (5) eval and checkpoint
            if data.test and ((tc.eval_every and done % tc.eval_every == 0) or done == total):
                last_eval = evaluate_loss(model, data.test, tc.batch_size, cfg.data.max_length, pad_id, cfg.data.packing,
                                          dev, amp, shard=(d.rank, d.world))
                log.write({"step": done, "split": "eval", **last_eval})
            cursor = stream.state()
            if (tc.save_every and (done % tc.save_every == 0 or done == total)) or stop.signum:
                if d.is_main:
                    checkpoint.save(run, done, core, opt, sched, cursor, tc.keep_last, fingerprint=fp)
                distributed.barrier(d)
            if stop.signum:
                print0(f"stopped by signal {stop.signum} at step {done}; checkpoint saved, resume with train.resume=auto")
                break

    result = {"run_dir": str(run), "steps": done, "train_loss": last_loss, "eval": last_eval,
              "tokens": tokens_seen, "train_seconds": t_train, "wall_seconds": time.time() - t0}
    if stop.signum:
        if d.is_main:
            end_segment(run, done, "stopped")
        distributed.shutdown(d)
        raise SystemExit(128 + stop.signum)
    if d.is_main:
        spec = {"template": data.template.to_dict(), "max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
                "fields": cfg.data.fields, "base_model": cfg.model.name}
        save_final(core, tok, run / "final", spec, merge=bool(cfg.lora and cfg.lora.merge))
        plot_losses(read_metrics(run / "metrics.jsonl"), run / "loss.png")
        result["plan"] = finish_plan(plan, run, tokens_seen, t_train, result["wall_seconds"], dev, before_model)
        (run / "train_result.json").write_text(json.dumps(result, indent=2, default=str))
        end_segment(run, done, "finished")
        print0(f"done: {result['steps']} steps, final model in {run / 'final'}")
    distributed.barrier(d)
    distributed.shutdown(d)
    return result


