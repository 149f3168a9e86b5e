"""The training loop on tiny models: it learns, LoRA freezes the base, grad-accum == big batch, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import tiny
from tunesmith.train import checkpoint
from tunesmith.train import loop as loop_mod
from tunesmith.train.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


cfg_for = tiny.train_config  # a tiny run into <tmp_path>/run (tests/tiny.py)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(next(path.glob("*.safetensors")))


def test_overfits_and_writes_run_dir(tmp_path, model_dir, qa_file):
    result = train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=30", "train.eval_every=10"))
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [10, 20, 30]
    assert {"config.yaml", "manifest.json", "plan.json", "metrics.jsonl", "loss.png", "final"} <= {
        p.name for p in run.iterdir()
    }
    assert result["eval"]["perplexity"] == pytest.approx(
        torch.tensor(result["eval"]["loss"]).exp().item(), rel=1e-5
    )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")  # plain transformers loads the final model
    assert json.loads((run / "final" / "tunesmith_template.json").read_text())["template"]["format"] == "qa"


def test_lora_trains_only_adapters(tmp_path, model_dir, qa_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=5", "lora.r=4", "lora.dropout=0.0"))
    final = tmp_path / "run" / "final"
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final)
    adapters = {n: p for n, p in tuned.named_parameters() if "lora_" in n}
    assert adapters and any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)  # B starts at 0
    base_sd = base.state_dict()
    for name, p in tuned.named_parameters():
        if "lora_" not in name:  # frozen base weights are bit-identical
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_sd[key]), name


def test_grad_accum_equals_big_batch(tmp_path, model_dir, qa_file):
    # Adam's first step is ~lr*sign(g): a modest lr keeps fp32 summation-order noise far below 1e-6.
    common = [
        "train.max_steps=1",
        "train.precision=fp32",
        "data.packing=false",
        "train.max_grad_norm=null",
        "train.lr=1e-4",
    ]
    train(cfg_for(tmp_path / "a", model_dir, qa_file, *common, "train.batch_size=2", "train.grad_accum=4"))
    train(cfg_for(tmp_path / "b", model_dir, qa_file, *common, "train.batch_size=8", "train.grad_accum=1"))
    a, b = weights(tmp_path / "a" / "run" / "final"), weights(tmp_path / "b" / "run" / "final")
    init = weights(model_dir)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the step did move the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def _cli(cfg_path: Path, *over: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "train", str(cfg_path), *over],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _write_cfg(tmp_path, model_dir, data, run: Path) -> Path:
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(f"""
model: {{name: {model_dir}}}
data: {{path: {data}, test_size: 4, max_length: 64}}
train: {{lr: 3.0e-3, batch_size: 4, max_steps: 8, save_every: 2, keep_last: 5, log_every: 1}}
out_dir: {run}
""")
    return path


def test_resume_after_sigkill_is_bit_identical(tmp_path, qa_file):
    # Dropout on, so the restored RNG state matters, not only weights and optimizer.
    model_dir = tmp_path / "m"
    m = tiny.gpt_neox(hidden_dropout=0.1, attention_dropout=0.1)
    m.save_pretrained(model_dir)
    tiny.tokenizer().save_pretrained(model_dir)
    whole = _cli(_write_cfg(tmp_path, model_dir, qa_file, tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    run = tmp_path / "killed"
    cfg = _write_cfg(tmp_path, model_dir, qa_file, run)
    proc = _cli(cfg)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-4").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before step 4"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    resumed = _cli(cfg, "train.resume=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = weights(tmp_path / "whole" / "final"), weights(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_then_exits(tmp_path, model_dir, qa_file):
    run = tmp_path / "term"
    cfg = _write_cfg(tmp_path, model_dir, qa_file, run)
    proc = _cli(cfg, "train.max_steps=100000", "train.save_every=0")
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    [ckpt] = checkpoint.checkpoints(run)
    assert int(ckpt.name.split("-")[1]) >= 3


def test_nan_loss_stops_and_names_step(tmp_path, model_dir, qa_file, monkeypatch):
    cfg = cfg_for(
        tmp_path, model_dir, qa_file, "train.max_steps=6", "train.save_every=1", "train.max_grad_norm=null"
    )
    calls = {"n": 0}
    real = loop_mod.loss_sum

    def poisoned(model, batch, smoothing):  # a numerically broken step 3: the loss becomes NaN
        calls["n"] += 1
        total, n = real(model, batch, smoothing)
        return (total * float("nan") if calls["n"] == 3 else total), n

    monkeypatch.setattr(loop_mod, "loss_sum", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 \(batch with .*qa.jsonl:\d+") as e:
        train(cfg)
    assert_stopped_before_the_update(run, str(e.value))


def assert_stopped_before_the_update(run: Path, msg: str) -> None:
    """Diverged at step 3: steps 1-2 checkpointed and intact, nothing after them saved, the way out named."""
    assert (
        "\n" not in msg
        and f"last good checkpoint {run / 'checkpoints' / 'step-2'} kept, no final/ written" in msg
    )
    assert "train.lr too high" in msg and "train.precision=fp16" in msg
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step-1", "step-2"]
    assert not (run / "final").exists()
    assert checkpoint.verify(run / "checkpoints" / "step-2") is None
    assert all(torch.isfinite(t).all() for t in weights(run / "checkpoints" / "step-2").values())
    [segment] = json.loads((run / "manifest.json").read_text())["segments"]
    assert (segment["status"], segment["ended_at_step"]) == ("diverged", 2)


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("clip", ["null", "1.0"])
def test_inf_gradient_with_finite_loss_stops_before_the_update(
    tmp_path, model_dir, qa_file, monkeypatch, clip
):
    cfg = cfg_for(
        tmp_path, model_dir, qa_file, "train.max_steps=6", "train.save_every=1", f"train.max_grad_norm={clip}"
    )
    calls = {"n": 0}
    real = loop_mod.loss_sum

    def poisoned(model, batch, smoothing):
        calls["n"] += 1
        total, n = real(model, batch, smoothing)
        return (_InfGrad.apply(total) if calls["n"] == 3 else total), n

    monkeypatch.setattr(loop_mod, "loss_sum", poisoned)
    run = tmp_path / "run"
    with pytest.raises(
        TrainingDiverged,
        match=r"gradient norm is (inf|nan) at step 3 \(loss [\d.]+, batch with .*qa.jsonl:\d+",
    ) as e:
        train(cfg)
    assert_stopped_before_the_update(run, str(e.value))


def test_failed_save_keeps_previous_checkpoint(tmp_path, model_dir, qa_file, monkeypatch):
    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=2", "train.save_every=2"))
    run = tmp_path / "run"
    before = load_file(run / "checkpoints" / "step-2" / "trainable.safetensors")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    model = tiny.gpt_neox()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError):
        checkpoint.save(run, 4, model, opt, sched, {"epoch": 0, "index": 0}, keep_last=1)
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step-2"]
    after = load_file(run / "checkpoints" / "step-2" / "trainable.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint.find_resume("auto", run).name == "step-2"


def test_fresh_run_into_old_out_dir_starts_a_fresh_log(tmp_path, model_dir, qa_file):
    for _ in range(2):
        train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=2"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]


def test_emulated_bf16_gets_a_warning_with_the_measured_factor(
    tmp_path, model_dir, qa_file, monkeypatch, capsys
):
    from tunesmith.train import preflight

    monkeypatch.setattr(preflight, "fast_bf16", lambda dev: False)  # a CPU without AVX512-BF16/AMX
    monkeypatch.setattr(preflight, "calibrated_peak_flops", lambda dev, bf16=False: 13.6e9 if bf16 else 103e9)
    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=1", "train.precision=bf16"))
    assert "bf16 autocast measured 7.6x slower than fp32 here" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "fast_bf16", lambda dev: True)
    train(
        cfg_for(
            tmp_path,
            model_dir,
            qa_file,
            "train.max_steps=1",
            "train.precision=bf16",
            f"out_dir={tmp_path / 'b'}",
        )
    )
    assert "no native bf16" not in capsys.readouterr().err


def test_fast_bf16_follows_the_cpu_probes():
    from tunesmith.runtime import fast_bf16

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fast_bf16(torch.device("cpu")) == native
    assert not fast_bf16(torch.device("meta"))


HUGE = """
import os, torch
from tunesmith.runtime import huge_pages_for_tensors
huge_pages_for_tensors()
x = torch.empty(2**24); x.fill_(1.0)  # 64 MB, touched
huge = [line.split()[1] for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(os.environ["THP_MEM_ALLOC_ENABLE"], huge[0])
"""


@pytest.mark.parametrize("user", [None, "0"])
def test_large_tensors_get_huge_pages_unless_the_user_said_no(user):
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this machine")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | (
        {"THP_MEM_ALLOC_ENABLE": user} if user else {}
    )
    setting, huge_kb = subprocess.run(
        [sys.executable, "-c", HUGE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    if user:
        assert setting == "0"
    else:
        assert setting == "1" and int(huge_kb) >= 32 * 1024  # most of the 64 MB tensor sits on 2 MB pages


def _train_rows(run: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


def _stopped_at_step_2_then_resumed(tmp_path, model_dir, qa_file, monkeypatch, *common) -> dict:
    """Train in tmp_path/split: SIGTERM in step 2 (checkpointed, exit), then train.resume=auto to the end."""
    calls = {"n": 0}
    real = loop_mod.loss_sum

    def sigterm_at_step_2(model, batch, smoothing):  # one micro-batch per step: call n is step n
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes step 2, checkpoints it and exits
        return real(model, batch, smoothing)

    monkeypatch.setattr(loop_mod, "loss_sum", sigterm_at_step_2)
    with pytest.raises(SystemExit):
        train(cfg_for(tmp_path / "split", model_dir, qa_file, *common))
    monkeypatch.setattr(loop_mod, "loss_sum", real)
    return train(cfg_for(tmp_path / "split", model_dir, qa_file, *common, "train.resume=auto"))


def test_resumed_run_counts_the_tokens_of_the_whole_run(tmp_path, model_dir, qa_file, monkeypatch):
    common = ["train.max_steps=4", "train.save_every=2", "train.precision=fp32"]
    whole = train(cfg_for(tmp_path / "whole", model_dir, qa_file, *common))
    resumed = _stopped_at_step_2_then_resumed(tmp_path, model_dir, qa_file, monkeypatch, *common)
    assert resumed["steps"] == 4 and 0 < whole["tokens"] == resumed["tokens"]
    rows = _train_rows(tmp_path / "split" / "run")
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in _train_rows(tmp_path / "whole" / "run")]
    assert (
        json.loads((tmp_path / "split" / "run" / "checkpoints" / "step-2" / "cursor.json").read_text())[
            "tokens"
        ]
        == rows[1]["tokens"]
    )


def test_old_checkpoint_without_a_token_count_still_resumes(tmp_path, model_dir, qa_file):
    cfg = ["train.max_steps=2", "train.save_every=1"]
    train(cfg_for(tmp_path, model_dir, qa_file, *cfg))
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    cursor = json.loads((ckpt / "cursor.json").read_text())
    del cursor["tokens"]
    (ckpt / "cursor.json").write_text(json.dumps(cursor))
    (ckpt / "checksums.json").unlink()  # as older tunesmith wrote them
    (tmp_path / "run" / "checkpoints" / "step-2").rename(tmp_path / "step-2-aside")
    result = train(cfg_for(tmp_path, model_dir, qa_file, *cfg, "train.resume=auto"))
    assert result["steps"] == 2 and result["tokens"] > 0  # the count restarts with this segment


def _inf_grad_from(step: int, monkeypatch, until: int | None = None) -> None:
    """Make the gradients of steps step..until (one micro-batch per step) inf while the loss stays finite."""
    calls = {"n": 0}
    real = loop_mod.loss_sum

    def poisoned(model, batch, smoothing):
        calls["n"] += 1
        total, n = real(model, batch, smoothing)
        return (_InfGrad.apply(total) if step <= calls["n"] <= (until or calls["n"]) else total), n

    monkeypatch.setattr(loop_mod, "loss_sum", poisoned)


def test_fp16_inf_gradient_is_a_skipped_step_not_a_divergence(tmp_path, model_dir, qa_file, monkeypatch):
    # CPU autocast runs fp16 for these tiny models, so this is the real GradScaler path, not a mock
    _inf_grad_from(3, monkeypatch, until=3)
    result = train(
        cfg_for(
            tmp_path,
            model_dir,
            qa_file,
            "train.max_steps=5",
            "train.save_every=1",
            "train.keep_last=10",
            "train.precision=fp16",
        )
    )
    assert result["steps"] == 5
    ckpts = tmp_path / "run" / "checkpoints"
    w2, w3, w4 = (load_file(ckpts / f"step-{s}" / "trainable.safetensors") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 skipped: the weights did not move
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again
    scales = [
        torch.load(ckpts / f"step-{s}" / "state.pt", weights_only=True)["scaler"]["scale"] for s in (2, 3)
    ]
    assert scales[1] == scales[0] / 2  # the skip halved the scale, and the checkpoint carries it
    rows = _train_rows(tmp_path / "run")
    assert [r["loss_scale"] for r in rows][1:3] == scales and not math.isfinite(rows[2]["grad_norm"])


def test_fp16_stops_once_the_loss_scale_collapses(tmp_path, model_dir, qa_file, monkeypatch):
    _inf_grad_from(2, monkeypatch)  # every step from 2 on overflows: no loss scale helps
    cfg = cfg_for(
        tmp_path, model_dir, qa_file, "train.max_steps=60", "train.save_every=1", "train.precision=fp16"
    )
    with pytest.raises(
        TrainingDiverged, match=r"gradient norm is (inf|nan) at step (\d+) with the fp16 loss scale down to"
    ) as e:
        train(cfg)
    step = int(e.value.args[0].split(" at step ")[1].split()[0])
    assert step == 2 + 29  # 2^16 halved 29 times is 1.2e-4; the 30th skip would take it below 1e-4
    assert "\n" not in str(e.value) and "train.precision=fp16" in str(e.value)
    assert not (tmp_path / "run" / "final").exists()


def test_fp16_loss_scaling_keeps_small_gradients(tmp_path, model_dir, qa_file, monkeypatch):
    # A loss this small underflows to zero gradients in fp16 without loss scaling: nothing would train.
    real = loop_mod.loss_sum
    monkeypatch.setattr(
        loop_mod,
        "loss_sum",
        lambda model, batch, smoothing: (lambda t, n: (t * 1e-7, n))(*real(model, batch, smoothing)),
    )
    train(
        cfg_for(
            tmp_path,
            model_dir,
            qa_file,
            "train.max_steps=1",
            "train.precision=fp16",
            "train.max_grad_norm=null",
            "train.weight_decay=0.0",
        )
    )
    moved, init = weights(tmp_path / "run" / "final"), weights(model_dir)
    layer = [k for k in moved if ".layers.0." in k and k.endswith("weight") and moved[k].ndim == 2]
    assert layer and all(not torch.equal(moved[k], init[k]) for k in layer)


def test_cli_reports_a_divergence_in_one_line_with_exit_code_1(tmp_path, model_dir, qa_file):
    # the CLI catches TrainingDiverged by type (config/errors.py, no torch import), not by its class name
    proc = _cli(_write_cfg(tmp_path, model_dir, qa_file, tmp_path / "run"), "train.lr=1e30")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and " at step " in lines[0] and "Traceback" not in err


def test_fp16_resume_restores_the_loss_scale(tmp_path, model_dir, qa_file, monkeypatch):
    # step 1 overflows, so the scale at the step-2 checkpoint is 2^15: a resume goes on from there, not 2^16
    common = ["train.max_steps=4", "train.save_every=2", "train.precision=fp16"]
    _inf_grad_from(1, monkeypatch, until=1)
    train(cfg_for(tmp_path / "whole", model_dir, qa_file, *common))
    monkeypatch.undo()
    _inf_grad_from(1, monkeypatch, until=1)  # counts calls over both segments: only step 1 overflows
    _stopped_at_step_2_then_resumed(tmp_path, model_dir, qa_file, monkeypatch, *common)
    scales = [[r["loss_scale"] for r in _train_rows(tmp_path / d / "run")] for d in ("whole", "split")]
    assert scales[0] == scales[1] == [2.0**15] * 4
    a, b = weights(tmp_path / "whole" / "run" / "final"), weights(tmp_path / "split" / "run" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
