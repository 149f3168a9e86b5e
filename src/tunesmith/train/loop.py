"""The training loop: one function, top to bottom in the order it runs. Full fine-tuning and LoRA alike.

LoRA changes only which parameters train (apply_lora), what a checkpoint holds (trainable tensors) and
whether export merges. Loss is normalised by the label tokens of the whole accumulated (and, under DDP,
global) batch, so batch_size=2 x grad_accum=4 is the same update as batch_size=8 x grad_accum=1.
Everything before the first step (data, pre-flight, run guard, model, optimizer, resume) is `prepare`.

Throughput, in metrics.jsonl (`tokens_per_s`), on the progress bar and in plan.json alike, counts real
tokens (not padding; prompt and answer tokens both) per second of training steps (eval and checkpoint time
excluded): the bar and the metrics row over the last log window, plan.json's measured side over the run.
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

from tunesmith.config import Config, TrainingDiverged
from tunesmith.data.pack import EpochStream
from tunesmith.data.render import IGNORE
from tunesmith.model.export import save_final
from tunesmith.model.loss import loss_sum, next_token_targets
from tunesmith.runtime import Dist, autocast, print0
from tunesmith.train import budget, checkpoint, distributed, evals, select, track
from tunesmith.train.log import MetricsLog, plot_losses, progress_bar, read_metrics
from tunesmith.train.prepare import Run, prepare
from tunesmith.train.record import end_segment, failed_on_error
from tunesmith.train.run_plan import finish_plan, mfu, per_step_short

__all__ = [
    "TrainingDiverged",
    "train",
]  # TrainingDiverged lives in config/errors.py (torch-free, for the CLI)

# fp16 loss scaling: an inf/NaN gradient is a skipped step and halves the scale. Once the scale would drop
# below this, gradients overflow fp16 even scaled down 10^4-fold (about 30 skips in a row from the initial
# 2^16): no scale is the problem any more, the weights or the data are, and the run stops as a divergence.
MIN_LOSS_SCALE = 1e-4


def _epoch(stream) -> float:
    """Fractional epoch for the log (a text stream reports its own whole-epoch count)."""
    if isinstance(stream, EpochStream):
        return stream.epoch + stream.index / max(1, stream.batches_per_epoch)
    return stream.epoch


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints at the end of the current step and exits."""

    signum: int = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum


@contextmanager
def _stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set the flag instead of killing the process; the old handlers return however the loop
    ends."""
    stop = StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Total gradient norm, clipping to max_norm when set; always computed, since a finite loss can come with
    inf/NaN gradients that would poison the weights silently."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = (
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        if max_norm
        else torch.nn.utils.get_total_norm([p.grad for p in params])
    )
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def _diverged(
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    step: int,
    wheres: list[str],
    lr: float,
    run: Path,
    scaler: torch.amp.GradScaler,
) -> str | None:
    """None while loss and gradient norm are finite (one device sync for both), else the one-line reason.

    fp16 (scaler enabled): an inf/NaN gradient with a finite loss is an overflow the scaler handles by
    skipping the step and halving the scale, so it is None too, until the scale would fall below
    MIN_LOSS_SCALE.
    """
    loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]).tolist()
    if math.isfinite(loss_v) and math.isfinite(norm_v):
        return None
    batch = ", ".join(wheres[:4]) + (" ..." if len(wheres) > 4 else "")
    if not math.isfinite(loss_v):
        head = f"loss is {loss_v} at step {step} (batch with {batch})"
    elif not scaler.is_enabled():
        head = f"gradient norm is {norm_v} at step {step} (loss {loss_v:.4g}, batch with {batch})"
    elif scaler.get_scale() * scaler.get_backoff_factor() >= MIN_LOSS_SCALE:
        return None  # a skipped step: scaler.step leaves the weights alone, scaler.update lowers the scale
    else:
        head = (
            f"gradient norm is {norm_v} at step {step} with the fp16 loss scale down to "
            f"{scaler.get_scale():.3g} (every recent step overflowed; loss {loss_v:.4g}, batch with {batch})"
        )
    # before this step (a corrupt later one skipped on resume may still sit there until it is re-saved)
    kept = [c for c in checkpoint.checkpoints(run) if int(c.name.split("-")[1]) < step]
    kept_msg = (
        f"last good checkpoint {kept[-1]} kept" if kept else "no checkpoint saved yet (train.save_every)"
    )
    return (
        f"{head}; stopped before the update, {kept_msg}, no final/ written "
        f"(usual causes: train.lr too high (now {lr:g}), train.precision=fp16 overflowing (use bf16 or "
        "fp32), bad labels in that batch; after a fix continue with train.resume=auto "
        "train.resume_changed=allow)"
    )


def _gather(
    stream, micro_per_step: int, d: Dist, dev: torch.device
) -> tuple[list[dict], list[str], int, int]:
    """This rank's micro-batches of one global step, their rows' places, and the global label and real-token
    counts.

    The counts come from the host-side batches before any copy to the device, so a single-process step
    never waits on the device for them; under torchrun one all-reduce sums them over ranks.
    """
    mine, wheres = [], []
    for k in range(micro_per_step):
        batch, w = stream.next()
        if k % d.world == d.rank:
            mine.append(batch)
            wheres += w
    counts = torch.tensor(
        [
            sum(int((next_token_targets(b) != IGNORE).sum()) for b in mine),
            sum(int(b["real_tokens"]) for b in mine),
        ]
    )
    if d.world > 1:
        counts = distributed.all_reduce_sum(counts.to(dev), d).cpu()
    return mine, wheres, max(1, int(counts[0])), int(counts[1])


def _forward_backward(
    model,
    mine: list[dict],
    n_labels: int,
    world: int,
    amp: torch.dtype | None,
    dev: torch.device,
    smoothing: float,
    scaler: torch.amp.GradScaler,
) -> torch.Tensor:
    """Backward of (sum of token losses / global label count) for each micro-batch; returns the summed loss.

    DDP averages gradients over ranks, so each rank scales by `world` to keep the update the mean over all
    label tokens of the global batch. `scaler` multiplies the loss by the fp16 loss scale (identity
    otherwise).
    """
    step_loss = torch.zeros((), device=dev)
    for i, batch in enumerate(mine):
        batch = {key: v.to(dev, non_blocking=True) for key, v in batch.items()}
        # DDP: all-reduce gradients only on the last micro-batch of the step
        last = i == len(mine) - 1 or not hasattr(model, "no_sync")
        with model.no_sync() if not last else nullcontext(), autocast(amp, dev):
            s, _ = loss_sum(model, batch, smoothing)
            scaler.scale(s * world / n_labels).backward()
        step_loss += s.detach()
    return step_loss


def train(cfg: Config) -> dict:
    """Fine-tune `cfg.model` on `cfg.data`; returns final metrics and the run dir (also the CLI's `train`)."""
    r = prepare(cfg)
    tc, d, dev = cfg.train, r.dist, r.dev
    log = MetricsLog(
        r.dir / "metrics.jsonl",
        track.open_trackers(cfg, r.dir, r.start) if d.is_main else [],  # train.report_to, rank 0 only
        enabled=d.is_main,
    )
    done, tokens, last_eval, last_loss, at_budget = r.start, r.tokens, {}, None, False
    # the best eval so far and the patience count (restored from the checkpoint on a resume)
    sel = select.start(tc.select, tc.select_mode, tc.early_stop_min_delta, tc.early_stop_patience, r.select)
    early = _early(sel, done, r.total)  # a run that stopped early, resumed: nothing left to train
    # training-step seconds only: eval and checkpoints excluded
    t_train, window_tokens, window_s = 0.0, 0, 0.0

    # an exception out of the loop marks the segment failed in manifest.json (`tunesmith runs` shows it)
    with (
        track.closed_on_error(log.trackers, r.dir),  # exits after failed_on_error recorded the end
        failed_on_error(r.dir, d.is_main, lambda: done),
        _stop_on_signals() as stop,
        progress_bar(d.is_main, per_step=per_step_short(r.plan)) as bar,
    ):
        task = bar.add_task(
            "train", total=r.total, completed=r.start, loss=float("nan"), lr=r.sched.get_last_lr()[0], tps=0.0
        )
        for step in range(r.start, r.start if early else r.total):
            t_step = time.time()
            # (1) this rank's micro-batches of the global step, (2) forward/backward of each (fp16: loss
            # scaled)
            mine, wheres, n_labels, real = _gather(r.stream, r.micro_per_step, d, dev)
            step_loss = _forward_backward(
                r.model, mine, n_labels, d.world, r.amp, dev, tc.label_smoothing, r.scaler
            )
            step_loss = distributed.all_reduce_sum(step_loss, d) / n_labels
            # (3) unscale and clip; a NaN/inf loss or gradient stops the run before it reaches the weights
            # (fp16: an inf gradient is a step the scaler skips, until the scale collapses); step, schedule
            r.scaler.unscale_(r.opt)
            grad_norm = _grad_norm(r.core, tc.max_grad_norm)
            lr = r.sched.get_last_lr()[0]
            reason = _diverged(step_loss, grad_norm, step + 1, wheres, lr, r.dir, r.scaler)
            if reason is not None:
                if d.is_main:
                    end_segment(r.dir, step, "diverged", error=reason)
                raise TrainingDiverged(reason)
            r.scaler.step(r.opt)  # opt.step(), unless fp16 found an inf/NaN gradient
            r.scaler.update()
            r.sched.step()
            r.opt.zero_grad(set_to_none=True)

            # (4) log: real (non-pad) tokens per second of training steps, MFU from the planner's FLOPs per
            # token
            done, tokens, window_tokens = step + 1, tokens + real, window_tokens + real
            seconds = time.time() - t_step
            t_train, window_s = t_train + seconds, window_s + seconds
            if done % tc.log_every == 0 or done == r.total:
                tps = window_tokens / max(window_s, 1e-9)
                row = {
                    "step": done,
                    "split": "train",
                    "loss": step_loss.item(),
                    "lr": lr,
                    "tokens": tokens,
                    "tokens_per_s": tps,
                    "epoch": _epoch(r.stream),
                    "grad_norm": float(grad_norm),
                    "mfu": mfu(r.plan, tps),
                }
                if r.scaler.is_enabled():
                    row["loss_scale"] = r.scaler.get_scale()
                log.write(row)
                last_loss, window_tokens, window_s = row["loss"], 0, 0.0
                bar.update(task, loss=row["loss"], tps=tps)
            bar.update(task, completed=done, lr=lr)

            # (5) train.time_budget: stop here when the next step, the final eval and the final save would
            # pass it; then eval (the last over all held-out), keep the best (best/), maybe stop early;
            # checkpoint (the cursor carries the token count and the selection, so a resumed run counts on)
            every = r.eval_every
            at_budget = done < r.total and budget.stop_now(r.guard, seconds, done + 1, every, d)
            last = done == r.total or at_budget
            if r.data.test and ((every and done % every == 0) or last):
                last_eval, sel = _eval_and_select(r, log, sel, done, last)
                early = _early(sel, done, r.total)
            if (tc.save_every and (done % tc.save_every == 0 or last or early)) or stop.signum or at_budget:
                t_save = time.time()
                if d.is_main:
                    checkpoint.save(
                        r.dir,
                        done,
                        r.core,
                        r.opt,
                        r.sched,
                        {**r.stream.state(), "tokens": tokens, "select": sel.to_dict()},
                        tc.keep_last,
                        fingerprint=r.fingerprint,
                        scaler=r.scaler,
                    )
                distributed.barrier(d)
                budget.saved(r.guard, time.time() - t_save)
            if stop.signum:
                print0(
                    f"stopped by signal {stop.signum} at step {done}; checkpoint saved, resume with "
                    "train.resume=auto"
                )
                break
            if early:
                log.write({"step": done, "split": "event", "event": "early_stop", "reason": early})
                print0(f"stopped early at step {done} of {r.total}: {early}")
                break
            if at_budget:
                log.write({"step": done, "split": "event", "event": "time_budget", "planned": r.total})
                print0(budget.stop_line(r.guard, done, r.dir / "checkpoints" / f"step-{done}"))
                break

    result = {
        "run_dir": str(r.dir),
        "steps": done,
        "train_loss": last_loss,
        "eval": last_eval,
        "tokens": tokens,
        "train_seconds": t_train,
        "wall_seconds": time.time() - r.t0,
        "best": sel.to_dict() if sel.step is not None else None,
        "early_stop": {"step": done, "reason": early} if early else None,
        "time_budget": {"step": done, "planned": r.total} if at_budget else None,
    }
    return _finish(r, result, stop.signum, tokens - r.tokens, sel, log.trackers)


def _finish(
    r: Run, result: dict, signum: int, segment_tokens: int, sel: select.Selection, trackers: list
) -> dict:
    """Stopped by a signal: exit 128+signum (checkpoint saved). Finished (or stopped early): final/, best/
    when the last eval was the best, loss.png, measured plan, manifest, and the held-out curve."""
    d, done = r.dist, result["steps"]
    if signum:
        if d.is_main:
            end_segment(r.dir, done, "stopped")
            track.finish(trackers, r.dir, "stopped")
        distributed.shutdown(d)
        raise SystemExit(128 + signum)
    if d.is_main:
        save_final(r.core, r.tok, r.dir / "final", _spec(r), merge=bool(r.cfg.lora and r.cfg.lora.merge))
        if sel.step == done:  # the last eval is the best: best/ is final/ (hard links)
            checkpoint.link_best(r.dir, r.dir / "final", select.best_info(sel, result["eval"]))
        plot_losses(read_metrics(r.dir / "metrics.jsonl"), r.dir / "loss.png")
        if r.guard is not None or r.budget is not None:
            stopped = result["time_budget"] is not None
            r.plan["budget"] = budget.measured(r.budget, r.guard, done, stopped, result)
        # this segment's tokens over this segment's step time: the rate the process ran at
        result["plan"] = finish_plan(
            r.plan,
            r.dir,
            segment_tokens,
            result["train_seconds"],
            result["wall_seconds"],
            r.dev,
            r.before_model,
        )
        (r.dir / "train_result.json").write_text(json.dumps(result, indent=2, default=str))
        extra = {k: result[k] for k in ("early_stop", "best", "time_budget")}
        end_segment(r.dir, done, "finished", extra=extra)
        track.finish(trackers, r.dir, "finished", r.dir / "final" if r.cfg.train.report_model else None)
        evals.print_curve(r, sel)
        print0(f"done: {result['steps']} steps, final model in {r.dir / 'final'}")
    distributed.barrier(d)
    distributed.shutdown(d)
    return result


def _spec(r: Run) -> dict:
    """What final/ and best/ record beside the weights: template, length, truncation, fields, base model."""
    cfg = r.cfg
    return {
        "template": r.data.template.to_dict(),
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "fields": cfg.data.fields,
        "base_model": cfg.model.name,
    }


def _early(sel: select.Selection, done: int, total: int) -> str | None:
    """Why the run stops early after the eval at `done` (None: it goes on, or has reached its end anyway)."""
    return select.stop_reason(sel) if select.should_stop(sel) and done < total else None


def _eval_and_select(
    r: Run, log: MetricsLog, sel: select.Selection, done: int, last: bool
) -> tuple[dict, select.Selection]:
    """Evaluate, log the eval row, update the selection; a new best before the last step is written to best/
    (the last step's best is linked from final/ once that is written)."""
    results, compared = evals.evaluate(r, last, sel.metric)
    epoch = _epoch(r.stream)
    log.write({"step": done, "split": "eval", "epoch": epoch, **results})
    sel, is_best = select.observe(sel, select.metric_value(sel, compared), done, epoch)
    if is_best and not last:
        if r.dist.is_main:
            merge = bool(r.cfg.lora and r.cfg.lora.merge)
            checkpoint.save_best(r.dir, r.core, r.tok, _spec(r), merge, select.best_info(sel, results))
        distributed.barrier(r.dist)
    return results, sel
