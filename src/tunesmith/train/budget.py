"""train.time_budget in training: the warm-up that measures speed on the spot, the sizing it feeds
(plan/budget.py does the arithmetic), the record a resume reuses, and the hard stop the loop asks each step.

The warm-up leaves the training untouched: its batches come from a separate EpochStream (the training
stream's cursor never moves), gradients are set back to None, the optimizer's state is cleared and the torch
RNG restored, so a budgeted run whose sizing equals an unbudgeted config trains bit-identical weights.

The optimizer step is timed honestly by taking one on the real parameters at lr=0 (AdamW then adds exactly
0 x update and decays by 1 - 0 x wd = 1: the weights do not move), after which the state it created (moments,
step count) is dropped, as a fresh optimizer has none. A non-finite warm-up gradient skips that timing (0 x
inf would be NaN); the hard stop then covers the step's cost.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tunesmith.config import Config, UserError
from tunesmith.data.pack import EpochStream, collate, epoch_batches
from tunesmith.data.pipeline import Prepared, first_examples, save_limit
from tunesmith.data.render import IGNORE
from tunesmith.model.loss import loss_sum, next_token_targets
from tunesmith.plan.budget import (
    EVAL_SHARE,
    Costs,
    Sizing,
    Speeds,
    epoch_eval_period,
    fit_examples,
    format_duration,
    size_steps,
    sizing_lines,
)
from tunesmith.runtime import Dist, autocast, print0
from tunesmith.train import distributed
from tunesmith.train.optim import total_steps
from tunesmith.train.run_plan import plan_for_data

BUDGET_FILE = "budget.json"  # <run>/budget.json: the sizing, reused by a resume
WARMUP_TIMED = (
    2  # timed forward+backward micro-batches after one untimed (allocations, kernel choice, compile)
)
# The final checkpoint and final/ are not measured before they happen: bytes at this write speed plus a fixed
# second (tokenizer, JSON, renames). A real checkpoint's duration replaces the guess once one is written.
WRITE_BYTES_PER_S = 200e6
WRITE_FIXED_S = 1.0


@dataclass
class Guard:
    """What the hard stop needs: the budget, when `train` started, and what the end of a run costs."""

    budget_s: float
    t0: float
    eval_s: float  # one periodic eval
    final_eval_s: float
    reserve_s: float  # the final checkpoint and final/
    planned: int  # steps planned (for the stop line)
    best_s: float = 0.0  # best/ written at a periodic eval that improves train.select


def elapsed(t0: float) -> float:
    """Seconds since `t0` (wall clock; the one place the hard stop reads the time)."""
    return time.time() - t0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _forward_backward(model, batch: dict, amp, dev: torch.device, smoothing: float) -> int:
    """One micro-batch's forward and backward as the loop runs it (one process, no loss scaling: the loop's
    own helper needs the global label count and the scaler); its real tokens."""
    batch = {k: v.to(dev) for k, v in batch.items()}
    n_labels = max(1, int((next_token_targets(batch) != IGNORE).sum()))
    with autocast(amp, dev):
        s, _ = loss_sum(model, batch, smoothing)
    (s / n_labels).backward()
    return int(batch["real_tokens"])


def _optimizer_step_s(model, opt: torch.optim.Optimizer, dev: torch.device) -> float:
    """Seconds of one optimizer step, taken at lr=0 on the real parameters; its state is then dropped."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not math.isfinite(float(torch.nn.utils.get_total_norm(grads))):
        return 0.0
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    try:
        _sync(dev)
        t = time.perf_counter()
        opt.step()
        _sync(dev)
        return time.perf_counter() - t
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        opt.state.clear()  # a fresh AdamW has no state: the first real step starts moments and count at 0


def _eval_forward_s(model, test: list[dict], cfg: Config, pad: int, amp, dev: torch.device) -> float:
    """Seconds per real token of a no-grad forward over the first held-out batch (0 without held-out data)."""
    if not test:
        return 0.0
    lengths = [len(s["input_ids"]) for s in test]
    rows = epoch_batches(lengths, cfg.train.batch_size, cfg.data.max_length, cfg.data.packing, 0, 0)[0]
    batch = {k: v.to(dev) for k, v in collate(test, rows, pad, cfg.data.packing).items()}
    model.eval()
    try:
        with torch.no_grad(), autocast(amp, dev):
            _sync(dev)
            t = time.perf_counter()
            loss_sum(model, batch)
            _sync(dev)
            return (time.perf_counter() - t) / max(1, int(batch["real_tokens"]))
    finally:
        model.train()


def measure(model, opt, data: Prepared, cfg: Config, pad: int, amp, dev: torch.device, d: Dist) -> Speeds:
    """Warm-up: seconds per real token of training (optimizer step included) and of an eval forward.

    Weights, optimizer state, the training stream and the torch RNG are left as they were (module docstring).
    Under torchrun each rank measures its own model (before DDP/FSDP wrapping: no gradient all-reduce is
    timed) and the ranks agree on the mean.
    """
    tc = cfg.train
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if dev.type == "cuda" else None
    stream = EpochStream(data.train, tc.batch_size, cfg.data.max_length, cfg.data.packing, tc.seed, pad)
    try:
        _forward_backward(model, stream.next()[0], amp, dev, tc.label_smoothing)  # untimed
        _sync(dev)
        t, tokens, slots = time.perf_counter(), 0, 0
        for _ in range(WARMUP_TIMED):
            batch = stream.next()[0]
            slots += batch["input_ids"].numel()  # (B, T): the positions computed, pads included
            tokens += _forward_backward(model, batch, amp, dev, tc.label_smoothing)
        _sync(dev)
        fwd_bwd_s = time.perf_counter() - t
        opt_s = _optimizer_step_s(model, opt, dev)
        opt.zero_grad(set_to_none=True)
        eval_s = _eval_forward_s(model, data.test, cfg, pad, amp, dev)
    finally:
        opt.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    # the optimizer step's share per token: one step per grad_accum micro-batches of this size
    per_token = fwd_bwd_s / max(tokens, 1) + opt_s / max(1.0, tokens / WARMUP_TIMED * tc.grad_accum)
    agreed = distributed.all_reduce_sum(torch.tensor([per_token, eval_s], dtype=torch.float64, device=dev), d)
    per_token, eval_s = (agreed / d.world).tolist()
    return Speeds(per_token, eval_s, "measured", tokens / max(slots, 1))


def save_seconds(trainable: int, full_bytes: int, merge_full: bool) -> tuple[float, float]:
    """(one checkpoint, the final checkpoint + final/) in seconds, from the bytes they write (a guess)."""
    ckpt = trainable * (4 + 8)  # fp32 weights + AdamW's two moments
    final = full_bytes if merge_full else trainable * 4
    return ckpt / WRITE_BYTES_PER_S + WRITE_FIXED_S, (ckpt + final) / WRITE_BYTES_PER_S + 2 * WRITE_FIXED_S


def best_seconds(trainable: int, full_bytes: int, merge_full: bool, heldout: bool) -> float:
    """One best/ save (written as final/ is, train/checkpoint.py: save_best), in seconds from its bytes; 0
    without held-out data (no evals, so train.select never writes best/)."""
    if not heldout:
        return 0.0
    return (full_bytes if merge_full else trainable * 4) / WRITE_BYTES_PER_S + WRITE_FIXED_S


def size_for(
    cfg: Config,
    data: Prepared,
    speeds: Speeds,
    spent: float,
    world: int,
    save_s: float,
    reserve_s: float,
    best_s: float = 0.0,
) -> Sizing:
    """The sizing of `cfg` on `data` (the whole pool under data.limit=auto): steps, pairs, eval period;
    `best_s`: one best/ save, counted at every periodic eval (any of them may improve train.select)."""
    tc, dc = cfg.train, cfg.data
    micro = tc.grad_accum * world
    lengths = [len(s["input_ids"]) for s in data.train]
    batches = len(epoch_batches(lengths, tc.batch_size, dc.max_length, dc.packing, tc.seed, 0))
    test = [len(s["input_ids"]) for s in data.test]
    costs = Costs(
        budget_s=float(tc.time_budget),
        spent_s=spent,
        tokens_per_step=sum(lengths) / max(batches, 1) * micro,
        eval_tokens=sum(test[: tc.eval_limit] if tc.eval_limit else test),
        final_eval_tokens=sum(test),
        save_every=tc.save_every,
        save_s=save_s,
        reserve_s=reserve_s,
        best_s=best_s,
    )
    if dc.limit != "auto":
        return _sized(tc, batches, micro, speeds, costs)
    n = fit_examples(lengths, tc.epochs, tc.eval_every, speeds, costs)

    def first(n: int) -> list[list[list[int]]]:  # the micro-batches of one pass over the first n pairs
        return epoch_batches(lengths[:n], tc.batch_size, dc.max_length, dc.packing, tc.seed, 0)

    for _ in range(2):  # the warm-up's rows were the pool's; n pairs pack into emptier ones (fixed point)
        n = fit_examples(lengths, tc.epochs, tc.eval_every, at_fill(speeds, lengths[:n], first(n)), costs)
    while True:  # the token arithmetic picked n; the real packing of n pairs may take a step more
        packed = first(n)
        batches = len(packed)
        # the steps of n pairs hold their tokens (the pool's average step can be fuller than theirs)
        cn = replace(costs, tokens_per_step=sum(lengths[:n]) / max(batches, 1) * micro)
        sn = at_fill(speeds, lengths[:n], packed)
        sizing = _sized(tc, batches, micro, sn, cn, examples_for(data, n), len(data.train_examples))
        if n == 1 or tc.max_steps or sizing.steps == sizing.configured_steps:
            return sizing
        n -= 1


def at_fill(speeds: Speeds, lengths: list[int], batches: list[list[list[int]]]) -> Speeds:
    """`speeds` for steps over `batches` (epoch_batches over samples of these lengths): a step costs its
    computed positions (rows x the batch's widest row), so seconds per real token scale by the warm-up's fill
    over theirs.

    The warm-up runs over the whole pool, whose packed rows are fuller than those of the few pairs it sizes:
    on the quickstart's data the warm-up's batches are 0.933 full and 33 pairs' 0.902, so their steps cost
    3.4% more per real token than measured (27 pairs: 1.8%; 50 and more: < 0.5%).
    """
    if speeds.fill is None:
        return speeds
    slots = sum(len(b) * max(sum(lengths[i] for i in row) for row in b) for b in batches)
    fill = sum(lengths) / max(slots, 1)
    return replace(speeds, train_s_per_token=speeds.train_s_per_token * speeds.fill / fill, fill=fill)


def _sized(tc, batches: int, micro: int, speeds: Speeds, costs: Costs, examples=None, pool=None) -> Sizing:
    """size_steps for `batches` micro-batches per epoch (eval_every='epoch' is one pass over them)."""
    configured = total_steps(tc, batches, micro)
    epochs = configured * micro / max(batches, 1)
    every = eval_period(tc.eval_every, batches, micro)
    per_pass = every
    if tc.eval_every == "epoch":  # every k-th pass when an eval per pass would eat the budget
        eval_s = costs.eval_tokens * speeds.eval_s_per_token
        every = epoch_eval_period(per_pass, configured, eval_s, costs.budget_s)
    sizing = size_steps(configured, every, epochs, speeds, costs, examples, pool)
    if every > per_pass:
        sizing.why += (
            f" eval_every=epoch: every {every // per_pass} passes, so the periodic evals stay under "
            f"{EVAL_SHARE:.0%} of the budget."
        )
    return sizing


def examples_for(data: Prepared, n: int) -> int:
    """How many training examples hold the first n rendered samples (more when rendering skipped some)."""
    where = data.train[n - 1]["where"]
    return next(i + 1 for i, ex in enumerate(data.train_examples) if ex.where == where)


def eval_period(eval_every: int | str, batches_per_epoch: int, micro_per_step: int) -> int:
    """train.eval_every in steps: 'epoch' is the optimizer steps of one pass over this run's data."""
    return max(1, -(-batches_per_epoch // micro_per_step)) if eval_every == "epoch" else int(eval_every)


def plan_with_budget(cfg: Config, data: Prepared) -> dict:
    """`tunesmith plan` under train.time_budget: the plan of the run sized from the planner's speed (the whole
    pool under data.limit=auto), with its sizing as the "budget" section."""
    plan = plan_for_data(cfg, data.train)
    m, weight_bytes = plan["model"], plan["run"]["weight_bytes"]
    merge_full = cfg.lora is None or cfg.lora.merge
    full_bytes = int(m["total"] * weight_bytes)
    save_s, reserve_s = save_seconds(m["trainable"], full_bytes, merge_full)
    best_s = best_seconds(m["trainable"], full_bytes, merge_full, bool(data.test))
    sizing = size_for(cfg, data, planner_speeds(plan), 0.0, 1, save_s, reserve_s, best_s)
    sized = cfg.model_copy(deep=True)
    sized.train.max_steps = sizing.steps
    samples = first_examples(data, sizing.examples).train if sizing.examples is not None else data.train
    return {**plan_for_data(sized, samples), "budget": sizing.to_dict()}


def planner_speeds(plan: dict) -> Speeds:
    """`tunesmith plan`'s speeds: the planner's tokens/s for training, its forward share for an eval."""
    t, f = plan["time"], plan["flops"]
    train = 1.0 / t["tokens_per_s"]
    return Speeds(train, train * f["forward"] / max(f["model"], 1.0), "planner")


# ---- the record a resume reuses


def recorded(run: Path) -> dict | None:
    """<run>/budget.json (None when the run was not sized)."""
    path = run / BUDGET_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def size_run(
    cfg: Config, run: Path, ckpt: Path | None, data: Prepared, model, opt, amp, pad: int, d: Dist, t0: float
) -> tuple[dict | None, Prepared]:
    """(the budget record, the data to train on): a resume reuses the record it started with (no new
    warm-up, same pairs and steps); a fresh budgeted run warms up, sizes, records and prints the sizing."""
    tc = cfg.train
    if ckpt is not None:
        rec = recorded(ckpt.parent.parent)  # <source run>/checkpoints/step-N
        if rec is None and cfg.data.limit == "auto":
            raise UserError(
                f"{ckpt}: data.limit=auto but the run has no {BUDGET_FILE} (it was not sized): resume with "
                "the data.limit it trained with"
            )
        if rec is None:
            return None, data  # a run that was not sized: the budget (if any) only stops it
        if d.is_main:
            (run / BUDGET_FILE).write_text(json.dumps(rec, indent=2))
            if rec["examples"] is not None:
                save_limit(run, data, rec["examples"])
        print0(f"time budget: resuming with the sizing recorded at the start ({rec['steps']} steps)")
        return rec, data if rec["examples"] is None else first_examples(data, rec["examples"])
    if tc.time_budget is None:
        return None, data
    if cfg.data.streaming:
        print0("time budget: a streamed corpus is not sized (no samples to warm up on); the budget stops it")
        return None, data
    speeds = measure(model, opt, data, cfg, pad, amp, next(model.parameters()).device, d)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    merge_full = cfg.lora is None or cfg.lora.merge
    save_s, reserve_s = save_seconds(trainable, full_bytes, merge_full)
    best_s = best_seconds(trainable, full_bytes, merge_full, bool(data.test))
    sizing = size_for(cfg, data, speeds, time.time() - t0, d.world, save_s, reserve_s, best_s)
    rec = {
        **sizing.to_dict(),
        "speeds": asdict(speeds),
        "save_s": save_s,
        "reserve_s": reserve_s,
        "best_s": best_s,
    }
    if d.is_main:
        (run / BUDGET_FILE).write_text(json.dumps(rec, indent=2))
        if sizing.examples is not None:
            save_limit(run, data, sizing.examples)
    if sizing.examples is not None:
        data = first_examples(data, sizing.examples)
    for line in sizing_lines(sizing.to_dict()):
        print0(line)
    return rec, data


# ---- the hard stop


def guard(cfg: Config, rec: dict | None, t0: float, planned: int) -> Guard | None:
    """The hard stop of this segment (None without train.time_budget): the budget counts from `t0`."""
    if cfg.train.time_budget is None:
        return None
    rec = rec or {}
    return Guard(
        budget_s=float(cfg.train.time_budget),
        t0=t0,
        eval_s=float(rec.get("eval_s", 0.0)),
        final_eval_s=float(rec.get("final_eval_s", 0.0)),
        reserve_s=float(rec.get("reserve_s", WRITE_FIXED_S)),
        planned=planned,
        best_s=float(rec.get("best_s", 0.0)),
    )


def stop_now(g: Guard | None, step_s: float, next_step: int, eval_every: int, d: Dist) -> bool:
    """True when the next step (`step_s`, as long as the last one; and its periodic eval with the best/ save
    it may write), the final eval and the final save would pass the budget. Rank 0 decides for all ranks (one
    all-reduce), so every rank stops at the same step."""
    if g is None:
        return False
    evals = bool(eval_every) and next_step % eval_every == 0
    need = step_s + (g.eval_s + g.best_s if evals else 0.0) + g.final_eval_s + g.reserve_s
    flag = torch.tensor([float(elapsed(g.t0) + need > g.budget_s and d.is_main)])
    return bool(distributed.all_reduce_sum(flag, d).item() > 0) if d.world > 1 else bool(flag.item())


def saved(g: Guard | None, seconds: float) -> None:
    """A real checkpoint took `seconds`: the final save is reserved at least that much from now on."""
    if g is not None:
        g.reserve_s = max(g.reserve_s, seconds + WRITE_FIXED_S)


def stop_line(g: Guard, done: int, checkpoint: Path) -> str:
    """The one line printed when the budget stops the run."""
    return (
        f"stopped at the time budget ({format_duration(g.budget_s)}) at step {done} of {g.planned} planned "
        f"({done / max(g.planned, 1):.0%} of the plan); checkpoint {checkpoint}, resume with "
        "train.resume=auto to finish"
    )


def measured(rec: dict | None, g: Guard | None, done: int, stopped: bool, result: dict) -> dict:
    """plan.json's budget section with the measured side filled in."""
    planned = g.planned if g is not None else (rec or {}).get("steps", done)
    return {
        **(rec or {}),
        "measured": {
            "train_s": result["train_seconds"],
            "wall_s": result["wall_seconds"],
            "stopped_at_budget": stopped,
            "steps": done,
            "fraction_of_plan": done / max(planned, 1),
        },
    }
