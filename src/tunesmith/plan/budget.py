"""Sizing a run to a wall-clock budget (train.time_budget): how many optimizer steps and, with
data.limit=auto, how many training pairs fit, from speeds measured on the spot (train's warm-up) or the
planner's estimate (`tunesmith plan`).

Pure arithmetic, no torch. The time model of a run of `steps` steps:
    spent (before training) + steps x step_s + periodic evals x eval_s + final_eval_s
    + periodic checkpoints x save_s + periodic evals x best_s + reserve_s (the final checkpoint and final/)
where step_s = tokens_per_step x train_s_per_token and an eval costs its real tokens x eval_s_per_token.
The periodic evals are those at multiples of eval_every before the last step (the last step's eval is the
final one, over all held-out examples). Each periodic eval may improve train.select, and an improving one
writes best/ (train/select.py): one best/ save per periodic eval is counted, as no one knows beforehand
which will improve (the final eval's best/ is hard links to final/, counted in reserve_s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass
class Speeds:
    """Seconds per real (non-pad) token of a training step (forward + backward + its share of the optimizer
    step) and of an eval forward, and where they come from."""

    train_s_per_token: float
    eval_s_per_token: float
    source: str  # "measured" (train's warm-up) or "planner" (tunesmith plan)
    # real tokens / computed positions (rows x padded width) of the batches the speed was measured on: a
    # step costs its computed positions, so the same speed over emptier rows is slower per real token
    # (None: unknown, as for the planner's speeds: taken as is)
    fill: float | None = None


@dataclass
class Costs:
    """What a run spends besides its steps, and what one step trains on."""

    budget_s: float
    spent_s: float  # already gone before the first step (data, model load, warm-up)
    tokens_per_step: float  # real tokens of one optimizer step, all ranks
    eval_tokens: int  # real tokens of a periodic eval (the first train.eval_limit held-out examples)
    final_eval_tokens: int  # real tokens of the final eval (all held-out examples)
    save_every: int  # train.save_every (0: no periodic checkpoints)
    save_s: float  # one checkpoint
    reserve_s: float  # the final checkpoint and final/ (the final eval is counted on its own)
    best_s: float = 0.0  # one best/ save at an improving periodic eval (0: train.select writes no best/)


@dataclass
class Sizing:
    """The run that fits the budget: steps, pairs, eval period, predicted seconds per part, and why."""

    budget_s: float
    spent_s: float
    steps: int
    configured_steps: int
    eval_every: int  # in steps (0: only the final eval)
    epochs: float  # passes over the trained pairs the steps make
    examples: int | None  # data.limit=auto: the first n training pairs trained on
    pool: int | None  # data.limit=auto: the training pairs there were to choose from
    step_s: float
    eval_s: float  # one periodic eval
    train_s: float
    evals_s: float  # the periodic evals
    final_eval_s: float
    saves_s: float  # periodic checkpoints + best/ at each periodic eval + the final checkpoint and final/
    end_s: float  # predicted wall-clock seconds from the start of `train` to the end of the run
    source: str
    why: str

    def to_dict(self) -> dict:
        """JSON-ready (plan.json's "budget" section, budget.json)."""
        return asdict(self)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_duration(seconds: float) -> str:
    """480 -> '8m0s', 45.2 -> '45s', 5400 -> '1h30m0s'."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


def periodic_evals(steps: int, eval_every: int) -> int:
    """Evals at multiples of eval_every before the last step (the last step's is the final eval)."""
    return (steps - 1) // eval_every if eval_every and steps > 0 else 0


# eval_every=epoch under a budget: the periodic evals may take at most this share of it. On a slow CPU a pass
# over the few pairs that fit is a step or two, and an eval after each took ~40% of a 4-minute budget.
EVAL_SHARE = 0.15


def epoch_eval_period(per_epoch: int, steps: int, eval_s: float, budget_s: float) -> int:
    """eval_every='epoch' in steps under a budget: every k-th pass, k the smallest whose periodic evals stay
    within EVAL_SHARE of the budget (k = 1 where evals are cheap)."""
    every = max(1, per_epoch)
    while periodic_evals(steps, every) * eval_s > EVAL_SHARE * budget_s and every < steps:
        every += max(1, per_epoch)
    return every


def predicted_seconds(steps: int, eval_every: int, speeds: Speeds, c: Costs) -> dict[str, float]:
    """Seconds of each part of a run of `steps` steps, and `end`: from the start of `train` to its end."""
    step_s, eval_s = c.tokens_per_step * speeds.train_s_per_token, c.eval_tokens * speeds.eval_s_per_token
    evals = periodic_evals(steps, eval_every)
    checkpoints = (steps - 1) // c.save_every if c.save_every else 0
    parts = {
        "train_s": steps * step_s,
        "evals_s": evals * eval_s,
        "final_eval_s": c.final_eval_tokens * speeds.eval_s_per_token,
        # every periodic eval may be the best so far: one best/ save each
        "saves_s": checkpoints * c.save_s + evals * c.best_s + c.reserve_s,
    }
    return {"step_s": step_s, "eval_s": eval_s, **parts, "end_s": c.spent_s + sum(parts.values())}


def steps_that_fit(eval_every: int, speeds: Speeds, c: Costs, at_most: int) -> int:
    """The most steps (<= at_most) whose predicted end is within the budget; 0 when not even one fits."""
    if predicted_seconds(at_most, eval_every, speeds, c)["end_s"] <= c.budget_s:
        return at_most
    lo, hi = 0, at_most  # the end grows with the steps: the largest fitting count by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predicted_seconds(mid, eval_every, speeds, c)["end_s"] <= c.budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def steps_for_tokens(tokens: int, epochs: float, tokens_per_step: float) -> int:
    """Optimizer steps that make `epochs` passes over `tokens` real tokens (at least 1)."""
    return max(1, math.ceil(epochs * tokens / max(tokens_per_step, 1e-9)))


def fit_examples(
    example_tokens: list[int], epochs: float, eval_every: int | str, speeds: Speeds, c: Costs
) -> int:
    """data.limit=auto: the largest n whose first n training pairs, `epochs` passes over them, fit the budget
    (at least 1, at most all of them). eval_every='epoch' evaluates every pass of the n pairs.

    >>> c = Costs(100.0, 10.0, 10.0, 0, 0, 0, 0.0, 0.0)
    >>> fit_examples([5] * 100, 2.0, 0, Speeds(1.0, 0.0, "measured"), c)  # 90 s: 2 x 5 x 9 = 90 tokens
    9
    """
    best, total = 1, 0
    for n, tokens in enumerate(example_tokens, start=1):
        total += tokens
        # an epoch of few pairs is one part-full step: its time is its tokens', not a full step's
        per_epoch = steps_for_tokens(total, 1.0, c.tokens_per_step)
        cn = replace(c, tokens_per_step=total / per_epoch)
        steps = steps_for_tokens(total, epochs, cn.tokens_per_step)
        eval_s = c.eval_tokens * speeds.eval_s_per_token
        every = (
            epoch_eval_period(per_epoch, steps, eval_s, c.budget_s)
            if eval_every == "epoch"
            else int(eval_every)
        )
        if predicted_seconds(steps, every, speeds, cn)["end_s"] <= c.budget_s:
            best = n  # the largest n that fits (a later eval boundary can make a smaller n not fit)
    return best


def size_steps(
    configured_steps: int,
    eval_every: int,
    epochs: float,
    speeds: Speeds,
    c: Costs,
    examples: int | None = None,
    pool: int | None = None,
) -> Sizing:
    """steps = min(configured, what fits, at least 1); the predicted seconds per part and the why.

    `epochs`: the passes `configured_steps` make over the trained pairs (the sized run makes that share);
    `examples`/`pool`: data.limit=auto's choice, for the why.
    """
    steps = max(1, steps_that_fit(eval_every, speeds, c, configured_steps))
    parts = predicted_seconds(steps, eval_every, speeds, c)
    why = _why(steps, configured_steps, eval_every, epochs * steps / configured_steps, speeds, c, parts)
    if examples is not None:
        ending = (
            f"all {pool:,} training pairs fit, so the run ends before the budget"
            if examples == pool
            else f"the first {examples:,} of {pool:,} training pairs fit"
        )
        why = f"data.limit=auto: {ending} at {epochs:g} epochs. " + why
    return Sizing(
        budget_s=c.budget_s,
        spent_s=c.spent_s,
        steps=steps,
        configured_steps=configured_steps,
        eval_every=eval_every,
        epochs=epochs * steps / configured_steps,
        examples=examples,
        pool=pool,
        source=speeds.source,
        why=why,
        **parts,
    )


def _why(
    steps: int, configured: int, every: int, epochs: float, speeds: Speeds, c: Costs, parts: dict
) -> str:
    """One paragraph: the speeds, the costs besides steps, the steps that fit and the predicted end."""
    spent = (
        f"{format_duration(c.spent_s)} spent before training"
        if speeds.source == "measured"
        else "less what train spends before its first step (data, model, warm-up)"
    )
    how = (
        "measured on the spot"
        if speeds.source == "measured"
        else "the planner's estimate (train measures on the spot and sizes again)"
    )
    evals = periodic_evals(steps, every)
    if steps < configured:
        fit = (
            f"{steps} of the {configured} configured steps fit: the run is re-planned to {_n(steps, 'step')} "
            f"(warmup and schedule over {steps}, {epochs:.3g} epochs)"
        )
    else:
        fit = f"all {configured} configured steps fit ({epochs:.3g} epochs)"
    if parts["end_s"] > c.budget_s:
        fit += "; even one step does not fit: the time budget stops the run"
    return (
        f"budget {format_duration(c.budget_s)}, {spent}; "
        f"{how}: {parts['step_s']:.3g} s per step ({c.tokens_per_step:,.0f} real tokens at "
        f"{speeds.train_s_per_token:.3g} s each, optimizer step included), evals {parts['eval_s']:.3g} s "
        f"each ({evals} periodic, every {every} steps) and {parts['final_eval_s']:.3g} s for the final one "
        f"over all held-out pairs, {parts['saves_s']:.3g} s for checkpoints, best/ ({c.best_s:.3g} s at "
        f"each periodic eval) and final/. {fit}; "
        f"predicted end at {format_duration(parts['end_s'])}."
    )


def sizing_lines(s: dict) -> list[str]:
    """What `train` and `tunesmith plan` print before training (a Sizing's dict): the numbers, then why."""
    pairs = f", {s['examples']:,} of {s['pool']:,} pairs" if s["examples"] is not None else ""
    return [
        f"time budget {format_duration(s['budget_s'])}: {_n(s['steps'], 'step')}{pairs}, "
        f"{s['epochs']:.3g} epochs, {s['step_s']:.3g} s/step, eval every {s['eval_every'] or '-'} steps, "
        f"predicted end at {format_duration(s['end_s'])}",
        s["why"],
    ]
