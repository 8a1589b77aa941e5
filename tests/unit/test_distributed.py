"""A job over 2 torch.distributed ranks (gloo, CPU) on the tiny Llama: same loss curve as 1 process, a rank
killed mid-run ends the attempt with nothing left behind, and the resume continues the same curve; with
`parallel: fsdp` (the base sharded) the same curve and adapter, and checkpoints either mode resumes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from devkit.tinymodel import build_tiny_llama, toy_dataset
from events.payloads import Hyperparameters
from handlers.tuning import distributed
from handlers.tuning.recipe import NullHooks, StepInfo, TrainResult, find_checkpoint, train

# 1 vs 2 processes: the same examples, the same global batch, gradients summed across ranks instead of in
# one process: only float summation order differs (seen: < 1e-5 on this model).
TOLERANCE = 1e-3


def _hp(**kw: Any) -> Hyperparameters:
    base: dict[str, Any] = dict(max_steps=12, batch_size=4, max_seq_len=128, learning_rate=1e-2,
                                target_modules="all-linear", eval_steps=4, save_steps=4, warmup_ratio=0.1,
                                validation_split=0.1, seed=7, lora_dropout=0.0)
    return Hyperparameters(**(base | kw))


def _ranks() -> list[int]:
    """Live rank processes started by this process."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"handlers.tuning.distributed" in cmd and " Z " not in stat[-200:]:
            pids.append(int(proc.name))
    return pids


class Recorder(NullHooks):
    def __init__(self, kill_rank1_at: int | None = None) -> None:
        self.infos: list[StepInfo] = []
        self.checkpoints: list[int] = []
        self.kill_at = kill_rank1_at
        self.pids: list[int] = []

    def on_step(self, info: StepInfo) -> None:
        self.infos.append(info)
        if not self.pids:
            self.pids = sorted(_ranks())
        if info.step == self.kill_at and info.eval_loss is None:
            os.kill(self.pids[1], signal.SIGKILL)  # rank 1 (started second)

    def on_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        assert (ckpt_dir / "adapter_model.safetensors").is_file()
        self.checkpoints.append(step)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_dataset(tmp_path_factory.mktemp("data") / "chat.jsonl", "chat", rows=64)


@pytest.fixture(scope="module")
def one(base_dir: Path, chat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The job in 1 process (checkpoints every 4 steps in its out_dir)."""
    return train(base_dir, chat_path, "chat", _hp(), tmp_path_factory.mktemp("one"), NullHooks())


def _curve(history: list[Any]) -> dict[int, float]:
    return {p.step: p.loss for p in history if p.loss is not None}


def _adapter(result: TrainResult) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(result.adapter_dir / "adapter_model.safetensors")


def test_two_ranks_match_one_process_and_a_killed_rank_resumes_the_same_curve(
    base_dir: Path, chat_path: Path, tmp_path: Path, one: TrainResult
) -> None:
    hp = _hp()

    # 2 ranks; rank 1 is killed -9 after step 5 (checkpoint 4 is on disk): the attempt ends, no rank is left
    hooks = Recorder(kill_rank1_at=5)
    with pytest.raises(distributed.RanksLost, match="rank 1 exited with SIGKILL"):
        distributed.train(2, base_dir, chat_path, "chat", hp, tmp_path / "two", hooks)
    assert len(hooks.pids) == 2 and hooks.checkpoints == [4]
    assert _ranks() == [] and not any(Path(f"/proc/{p}").exists() for p in hooks.pids), "a rank outlived the attempt"
    before = {i.step: i.loss for i in hooks.infos if i.eval_loss is None}
    assert max(before) >= 5
    for step, loss in before.items():
        assert loss == pytest.approx(_curve(one.loss_history)[step], abs=TOLERANCE), step

    ckpt = find_checkpoint(tmp_path / "two")
    assert ckpt is not None and ckpt.name == "step-4"
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["world_size"] == 2 and len(meta["rng_ranks"]) == 1  # rank 1's RNG state is in rank 0's checkpoint

    resumed = distributed.train(2, base_dir, chat_path, "chat", hp, tmp_path / "two", Recorder(),
                                resume_dir=tmp_path / "two")
    assert resumed.metrics.resumed_from_step == 4 and resumed.metrics.steps == 12
    assert resumed.metrics.tokens == one.metrics.tokens  # the global batch is the job's, whatever N
    a, b = _curve(one.loss_history), _curve(resumed.loss_history)
    assert sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= TOLERANCE
    assert resumed.metrics.eval_loss == pytest.approx(one.metrics.eval_loss, abs=TOLERANCE)
    assert (resumed.adapter_dir / "adapter_model.safetensors").is_file()
    assert _ranks() == []


def test_fsdp_gives_the_same_curve_and_adapter_and_checkpoints_resume_under_either_mode(
    base_dir: Path, chat_path: Path, tmp_path: Path, one: TrainResult
) -> None:
    fsdp_hp = _hp(devices=2, parallel="fsdp")
    sharded = distributed.train(2, base_dir, chat_path, "chat", fsdp_hp, tmp_path / "fsdp", Recorder())
    a, b = _curve(one.loss_history), _curve(sharded.loss_history)
    assert sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= TOLERANCE
    assert sharded.metrics.eval_loss == pytest.approx(one.metrics.eval_loss, abs=TOLERANCE)
    assert sharded.metrics.tokens == one.metrics.tokens

    # fsdp's checkpoint (step 8) resumed by DDP over 2 ranks: the same adapter at step 12
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-8"
    ddp = distributed.train(2, base_dir, chat_path, "chat", _hp(devices=2), tmp_path / "ddp", Recorder(),
                            resume_dir=ckpt)
    assert ddp.metrics.resumed_from_step == 8
    ours, theirs = _adapter(sharded), _adapter(ddp)
    assert sorted(ours) == sorted(theirs) and len(ours) == 28  # q k v o gate up down x A, B x 2 layers
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= TOLERANCE
    assert max(abs(a[s] - _curve(ddp.loss_history)[s]) for s in a) <= TOLERANCE

    # a 1-process checkpoint (step 8) resumed by fsdp over 2 ranks: the 1-process adapter (early stopping
    # keeps the best adapter: the one at step 12, the only eval after the resume)
    hp = _hp(devices=2, parallel="fsdp", early_stopping_patience=5)
    again = distributed.train(2, base_dir, chat_path, "chat", hp, tmp_path / "fsdp2", Recorder(),
                              resume_dir=one.adapter_dir.parent / "checkpoints" / "step-8")
    assert again.metrics.resumed_from_step == 8
    single = _adapter(one)
    assert max((_adapter(again)[k] - single[k]).abs().max().item() for k in single) <= TOLERANCE

    # the saved adapter loads on the base as any adapter does (export's path)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), sharded.adapter_dir)
    weights = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert max((weights[k] - theirs[k]).abs().max().item() for k in theirs) <= TOLERANCE
    assert _ranks() == []


def test_fsdp_with_a_rank_that_has_no_example_in_a_step(base_dir: Path, chat_path: Path, tmp_path: Path) -> None:
    """batch_size 1 over 2 ranks: rank 1 has nothing to train on; it joins rank 0's passes with zero weight."""
    hp = _hp(batch_size=1, max_steps=2, eval_steps=2, save_steps=2)
    single = train(base_dir, chat_path, "chat", hp, tmp_path / "one", NullHooks())
    two = distributed.train(2, base_dir, chat_path, "chat", hp.model_copy(update={"devices": 2, "parallel": "fsdp"}),
                            tmp_path / "fsdp", Recorder())
    a, b = _curve(single.loss_history), _curve(two.loss_history)
    assert sorted(b) == [1, 2] and max(abs(a[s] - b[s]) for s in a) <= TOLERANCE
    assert two.metrics.eval_loss == pytest.approx(single.metrics.eval_loss, abs=TOLERANCE)


def test_devices_are_validated_and_capped_by_the_worker() -> None:
    with pytest.raises(ValueError, match="devices"):
        Hyperparameters(devices=0)
    with pytest.raises(ValueError, match="fsdp"):
        Hyperparameters(parallel="fsdp")  # 1 process: nothing to shard across
    with pytest.raises(ValueError, match="parallel"):
        Hyperparameters(devices=2, parallel="zero3")
    assert distributed.devices_for(Hyperparameters(devices=4), max_devices=2) == 2
    assert distributed.devices_for(Hyperparameters(devices=4), max_devices=1) == 1
    assert distributed.devices_for(Hyperparameters(), max_devices=8) == 1
