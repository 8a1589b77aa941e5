"""The LoRA fine-tuning recipe: one readable, resumable training loop (torchtune style).

Why a plain loop instead of HF `Trainer`: every piece the pipeline depends on is visible here — exact
resume (optimizer, scheduler, RNG and data position), cancellation at the next step, progress and
checkpoint callbacks for the stage handler, and packed batches without padding. No broker, database or
object-store import: the handler runs `train()` in a worker thread and talks to it through `TrainHooks`.

Flow of `train()`:
1. threads/device/seed → tokenizer → data (`data.prepare`: checked, masked, split, packed or padded)
2. base model (bf16 + sdpa on CUDA, fp32 on CPU) wrapped by peft LoRA; AdamW; warmup + schedule
3. loop: each optimizer step consumes `gradient_accumulation_steps` micro-batches from an endless stream
   whose order per epoch comes from `order_seed(seed, epoch)`; loss is summed over tokens and divided
   by the window's label count (exact token-mean under accumulation); grads clipped at 1.0
4. eval every `eval_steps` (+ once at the end), early stopping on eval loss, checkpoint every
   `save_steps` into `out_dir/checkpoints/step-N/`, final adapter + tokenizer into `out_dir/adapter/`.

Under torch.distributed (`handlers.tuning.distributed` starts the ranks) the same loop runs in every rank:
each takes every N-th example of each step's window (the global batch and the order stay the job's), the
LoRA gradients and the loss are summed across ranks before the step (so the update is the one a single
process makes), eval shards the held-out rows, cancellation is agreed each step, and rank 0 alone reports
and writes checkpoints (holding every rank's RNG state) and the adapter. With `parallel: fsdp` the frozen
base is sharded across the ranks too (`sharded`: FSDP2 reduces the LoRA gradients itself; checkpoints keep
the same format, gathered whole).

A checkpoint holds the adapter (`save_pretrained`), `optimizer.pt`, `scheduler.pt`, `rng.pt` +
`trainer_state.json` (step, micro-batch position, epoch, batch index, order seed, tokens, loss history,
early-stopping state). Resuming from it replays the same data order and RNG streams, so a resumed run ends
at the same step with the same losses (bit-identical on CPU) as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from core.errors import HyperparameterError, InvalidInputError
from events.payloads import Hyperparameters, LossPoint, TrainMetrics
from handlers.tuning import data as D
from handlers.tuning import dropout, packed, sharded
from handlers.tuning.loss import token_loss_sum
from storage.keys import CHECKPOINT_STATE_FILE as STATE_FILE
from storage.local import TOKENIZER_FILES

log = logging.getLogger("codetune.tuning.recipe")

MAX_GRAD_NORM = 1.0
# Padded tokens per forward/backward pass: bounds activation memory whatever the batch size (a packed batch
# of 8 x 512 runs as 8 passes of 512). On CPU, 512 keeps a pass's activations near a padded batch of 8 short
# chats and short matmuls suit 2 cores (2 x 512 beat 8 x 512 by x1.4 on SmolLM2); a GPU wants big passes.
PASS_TOKENS = {"cpu": 512, "cuda": 16384}
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


# --------------------------------------------------------------------------- public types


@dataclass
class StepInfo:
    """Progress after an optimizer step. `eval_loss` is set only on the extra call made after an eval."""

    step: int
    max_steps: int
    epoch: float
    loss: float | None
    eval_loss: float | None
    learning_rate: float
    tokens: int
    tokens_per_s: float
    eta_s: float | None
    step_s: float = 0.0  # the last optimizer step's time (handlers/metrics.py)
    step_tokens: int = 0  # the real tokens of the last optimizer step


class TrainHooks(Protocol):
    def on_step(self, info: StepInfo) -> None: ...  # every optimizer step (and after each eval)

    def on_checkpoint(self, ckpt_dir: Path, step: int) -> None: ...  # a full checkpoint is on local disk

    def should_stop(self) -> bool: ...  # cancellation, checked before every step


class NullHooks:
    """Hooks that do nothing (CLI runs, benches)."""

    def on_step(self, info: StepInfo) -> None:
        pass

    def on_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: TrainMetrics
    loss_history: list[LossPoint]
    cancelled: bool
    stopped_early: bool


# --------------------------------------------------------------------------- run state


@dataclass
class _Plan:
    """Everything that fixes the data order; a checkpoint is only valid for the same plan."""

    seed: int
    n_train: int
    n_batches: int
    batch_size: int
    accum: int
    max_steps: int
    warmup_steps: int
    packing: bool
    max_seq_len: int


@dataclass
class _State:
    step: int = 0
    micro: int = 0  # micro-batches consumed since the start of training (all epochs)
    tokens: int = 0
    best_eval: float | None = None
    bad_evals: int = 0
    history: list[LossPoint] = field(default_factory=list)


def order_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffle: stable across processes (unlike `hash`)."""
    return seed * 1_000_003 + epoch


# --------------------------------------------------------------------------- environment


def cpu_budget() -> int:
    """CPUs this process may really use: affinity mask, capped by a cgroup v2 quota if any."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    return max(1, n)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_ranks() -> int:
    """Ranks sharing this host (torchrun's LOCAL_WORLD_SIZE; all of them when it is not set)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world()[1])


def _setup_threads() -> None:
    """Never oversubscribe: torch may default to the host's core count inside a 2-CPU container, and the
    ranks of a multi-process job share the host's CPUs.

    Called in the training thread itself, as OpenMP thread counts are per calling thread.
    """
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cpu_budget() // _local_ranks())))


def _device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if world()[1] > 1 else torch.device("cuda")
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py = random.getstate()
    npy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # the legacy tuple form
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return plain, tensors


def _rank_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int) -> tuple[
    dict[str, Any], dict[str, torch.Tensor]
] | None:
    """This rank's RNG state in a checkpoint (rank 0's is `rng` / the plain keys; rank r's `rng_ranks[r-1]` /
    the `rankR:` keys); None when the checkpoint was written by fewer ranks."""
    if rank == 0:
        return meta["rng"], {k: v for k, v in tensors.items() if ":" not in k}
    others = meta.get("rng_ranks") or []
    if rank > len(others):
        return None
    prefix = f"rank{rank}:"
    return others[rank - 1], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- model and optimizer


def _load_model(base_dir: Path, hp: Hyperparameters, device: torch.device, dtype: torch.dtype,
                on_host: bool = False) -> Any:
    """`on_host`: stay in host memory (FSDP moves each rank's shards to its GPU), in the GPU's dtype."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = device.type == "cuda"
    if on_host:
        device = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=dtype if cuda else torch.float32,
        attn_implementation=packed.register(),  # SDPA, example by example in packed rows
        device_map={"": device.index or 0} if device.type == "cuda" else None,  # straight to the GPU
    )
    model.config.use_cache = False
    lora = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (alpha / r)
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 probes transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    if not cuda:
        dropout.install(peft_model)  # the same LoRA dropout without torch's slow CPU Bernoulli sampler
    return peft_model.to(device)  # peft keeps LoRA weights in fp32 (autocast handles bf16)


def _optimizer(model: Any, hp: Hyperparameters, plan: _Plan) -> tuple[torch.optim.Optimizer, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all LoRA tensors (CUDA and, since torch 2.4, CPU) instead of a loop over them
    opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=True)
    sched = get_scheduler(_SCHEDULERS[hp.lr_scheduler], opt, num_warmup_steps=plan.warmup_steps,
                          num_training_steps=plan.max_steps)
    return opt, sched


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's saved names), on the CPU; a collective under FSDP."""
    from peft import get_peft_model_state_dict

    whole = sharded.full_trainable(model) if sharded.is_sharded(model) else None
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model, whole).items()}


def _load_lora_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    if sharded.is_sharded(model):  # peft's names without the adapter's: the rule peft saves by
        suffix = f".{model.active_adapter}"
        names = {n.replace(suffix, ""): n for n, p in model.named_parameters() if p.requires_grad}
        unknown = [k for k in state if k not in names]
        missing = sharded.load_trainable(model, {names[k]: v for k, v in state.items() if k in names})
        if unknown or missing:
            raise InvalidInputError(f"checkpoint adapter does not match the model: {(unknown + missing)[:3]}")
        return
    result: Any = set_peft_model_state_dict(model, state)  # peft annotates `namedtuple`: torch's _IncompatibleKeys
    bad = [k for k in (*result.unexpected_keys, *result.missing_keys) if "lora_" in k]
    if bad:
        raise InvalidInputError(f"checkpoint adapter does not match the model: {bad[:3]}")


# --------------------------------------------------------------------------- data stream


def _make_plan(hp: Hyperparameters, n_train: int) -> _Plan:
    n_batches = D.num_batches(n_train, hp.batch_size)
    if hp.max_steps is not None:
        max_steps = hp.max_steps
    else:
        max_steps = max(1, math.ceil((hp.epochs or 1) * n_batches / hp.gradient_accumulation_steps))
    return _Plan(seed=hp.seed, n_train=n_train, n_batches=n_batches, batch_size=hp.batch_size,
                 accum=hp.gradient_accumulation_steps, max_steps=max_steps,
                 warmup_steps=math.ceil(hp.warmup_ratio * max_steps), packing=hp.packing,
                 max_seq_len=hp.max_seq_len)


def _micro_batches(train: list[D.Example], plan: _Plan, start: int) -> Iterator[list[D.Example]]:
    """Endless stream of micro-batches from global position `start` (epoch-wise reshuffled)."""
    epoch, index = divmod(start, plan.n_batches)
    while True:
        order = D.batch_order(len(train), plan.batch_size, order_seed(plan.seed, epoch))
        for batch in order[index:]:
            yield [train[i] for i in batch]
        epoch, index = epoch + 1, 0


def _token_loss_sum(model: Any, batch: dict[str, torch.Tensor], autocast: Any) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions (fp32; chunked LM head, see `loss`)."""
    labels = batch.pop("labels")
    with autocast:
        return token_loss_sum(model, batch, labels)


def _passes(items: list[D.Example], budget: int) -> list[list[D.Example]]:
    """Split a micro-batch into forward/backward passes of at most ~`budget` padded tokens each.

    The gradient is the same (losses are token sums over the whole window, divided once), but activation
    memory follows the pass, not the batch, and on a CPU shorter matmuls are also faster. Longest first,
    so a padded pass groups examples of similar length.
    """
    order = sorted(items, key=len, reverse=True)
    passes: list[list[D.Example]] = []
    for ex in order:
        if passes and (len(passes[-1]) + 1) * len(passes[-1][0]) <= budget:
            passes[-1].append(ex)
        else:
            passes.append([ex])
    return passes


def _n_labels(items: list[D.Example]) -> int:
    return sum(sum(1 for x in ex.labels[1:] if x != D.IGNORE_INDEX) for ex in items)


# --------------------------------------------------------------------------- checkpoints


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint in `path` itself, or the highest `step-N` under `path` or `path/checkpoints`."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    candidates = [p for base in (path, path / "checkpoints") if base.is_dir()
                  for p in base.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return max(candidates, key=lambda p: int(p.name[5:]), default=None)


def _save_checkpoint(out_dir: Path, model: Any, opt: Any, sched: Any, state: _State, plan: _Plan,
                     best: dict[str, torch.Tensor] | None) -> Path | None:
    """Write `checkpoints/step-N` atomically (temp dir + rename): a crash never leaves half a checkpoint.

    Under torch.distributed every rank calls this (its RNG state is gathered) and rank 0 alone writes;
    the other ranks get None."""
    rank, size = world()
    plain, tensors = _rng_state()
    ranks: list[Any] = [(plain, tensors)]
    fsdp = sharded.is_sharded(model)
    adapter = sharded.full_trainable(model) if fsdp else None  # collectives: before rank 0 goes on alone
    opt_state = sharded.full_optimizer_state(opt) if fsdp else opt.state_dict()
    if size > 1:
        import torch.distributed as dist

        ranks = [None] * size if rank == 0 else []
        dist.gather_object((plain, tensors), ranks if rank == 0 else None, dst=0)
        if rank != 0:
            return None
    final = out_dir / "checkpoints" / f"step-{state.step}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=adapter)
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    for r, (_, more) in enumerate(ranks[1:], start=1):
        tensors |= {f"rank{r}:{k}": v.cpu() for k, v in more.items()}
    torch.save(tensors, tmp / "rng.pt")
    if best is not None:
        from safetensors.torch import save_file

        save_file(best, tmp / "best_adapter.safetensors")
    epoch, batch_index = divmod(state.micro, plan.n_batches)
    meta = {
        "step": state.step, "micro_batches": state.micro, "epoch": epoch, "batch_index": batch_index,
        "order_seed": order_seed(plan.seed, epoch), "tokens": state.tokens, "best_eval": state.best_eval,
        "bad_evals": state.bad_evals, "rng": plain, "plan": asdict(plan), "world_size": size,
        "rng_ranks": [p for p, _ in ranks[1:]],
        "history": [p.model_dump() for p in state.history],
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _load_checkpoint(ckpt: Path, model: Any, opt: Any, sched: Any, plan: _Plan) -> tuple[
    _State, dict[str, torch.Tensor] | None
]:
    from safetensors.torch import load_file

    meta = json.loads((ckpt / STATE_FILE).read_text())
    if meta["plan"] != asdict(plan):
        diff = {k: (v, asdict(plan)[k]) for k, v in meta["plan"].items() if asdict(plan).get(k) != v}
        raise InvalidInputError(f"checkpoint {ckpt.name} was made for another run (checkpoint, now): {diff}")
    _load_lora_state(model, load_file(ckpt / "adapter_model.safetensors"))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    if sharded.is_sharded(model):
        sharded.shard_optimizer_state(opt)
    sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rank = world()[0]
    rng = _rank_rng(meta, torch.load(ckpt / "rng.pt", weights_only=True), rank)
    if rng is not None:
        _set_rng_state(*rng)
    else:  # a checkpoint of fewer ranks: this rank's dropout stream starts afresh (data order is unchanged)
        log.info("checkpoint %s has no RNG state for rank %d: seeding it", ckpt.name, rank)
        _seed_all(plan.seed + rank + 1_000_003 * meta["step"])
    best_file = ckpt / "best_adapter.safetensors"
    state = _State(step=meta["step"], micro=meta["micro_batches"], tokens=meta["tokens"],
                   best_eval=meta["best_eval"], bad_evals=meta["bad_evals"],
                   history=[LossPoint(**p) for p in meta["history"]])
    return state, load_file(best_file) if best_file.is_file() else None


def _save_adapter(model: Any, tokenizer: Any, base_dir: Path, adapter_dir: Path,
                  base: tuple[str, str] | None = None, whole: dict[str, torch.Tensor] | None = None) -> Path:
    """Adapter + the base's tokenizer files: the directory alone says how to prompt the tune.

    `base` = (hub repo id, revision) the base was pulled from: `adapter_config.json` and the model card
    name it instead of the worker's local folder, so `AutoPeftModelForCausalLM.from_pretrained(adapter)`
    resolves the base anywhere and no local path is published. `whole`: the gathered weights of a sharded
    model (`sharded.full_trainable`)."""
    shutil.rmtree(adapter_dir, ignore_errors=True)
    if base is not None:
        repo_id, revision = base
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path, cfg.revision = repo_id, revision
        base_model = model.get_base_model()
        base_model.config._name_or_path = base_model.name_or_path = repo_id  # peft's model card and its tags
        tokenizer.name_or_path = repo_id
        # peft's "auto" would ask the hub whether the vocabulary changed; this recipe never resizes it,
        # so only LoRA on an embedding needs the embeddings saved (the rule "auto" applies otherwise)
        embeddings = any(getattr(m, "lora_embedding_A", None) for m in model.modules())
        model.save_pretrained(adapter_dir, save_embedding_layers=embeddings, state_dict=whole)
    else:
        model.save_pretrained(adapter_dir, state_dict=whole)
    tokenizer.save_pretrained(adapter_dir)  # carries a defaulted chat template, if one was set
    for name in TOKENIZER_FILES:
        src = Path(base_dir) / name
        if src.is_file() and not (adapter_dir / name).exists():
            shutil.copyfile(src, adapter_dir / name)  # e.g. tokenizer.model, for llama.cpp's converters
    return adapter_dir


# --------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(model: Any, items: list[D.Example], batch_size: int, pad_id: int, device: torch.device,
             autocast: Any) -> float | None:
    """Token-weighted mean loss over the validation set (None if it has no labelled token)."""
    if not items:
        return None
    model.eval()
    rank, size = world()
    total, count = 0.0, 0
    chunks = list(D.iter_batches(items, batch_size))
    mine = chunks[rank::size]  # this rank's share of the held-out rows
    rounds = -(-len(chunks) // size) if sharded.is_sharded(model) else len(mine)  # FSDP: same passes
    for i in range(rounds):
        chunk = mine[i] if i < len(mine) else chunks[0]
        batch = {k: v.to(device) for k, v in D.to_tensors(chunk, pad_id).items()}
        loss = _token_loss_sum(model, batch, autocast).item()
        if i < len(mine):  # else a pass only to join the others' all-gathers
            total += loss
            count += _n_labels(chunk)
    if size > 1:
        import torch.distributed as dist

        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = sums[0].item(), int(sums[1].item())
    model.train()
    return total / count if count else None


# --------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What the loop needs at hand; keeps `train()` short."""

    model: Any
    opt: torch.optim.Optimizer
    sched: Any
    plan: _Plan
    hp: Hyperparameters
    hooks: TrainHooks
    out_dir: Path
    device: torch.device
    autocast: Any
    pad_id: int
    val: list[D.Example]
    state: _State
    best: dict[str, torch.Tensor] | None = None
    train_time: float = 0.0  # seconds inside optimizer steps this session (no eval, no checkpoint I/O)
    session_tokens: int = 0
    last_step: tuple[float, int] = (0.0, 0)  # (seconds, tokens) of the last optimizer step
    resumed_at: int = 0
    trainable: list[torch.Tensor] = field(default_factory=list)
    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP (`parallel: fsdp` over > 1 rank)

    def info(self, loss: float | None, eval_loss: float | None, lr: float) -> StepInfo:
        s = self.state
        per_step = self.train_time / max(1, s.step - self.resumed_at)
        return StepInfo(
            step=s.step, max_steps=self.plan.max_steps, epoch=round(s.micro / self.plan.n_batches, 4),
            loss=loss, eval_loss=eval_loss, learning_rate=lr, tokens=s.tokens,
            tokens_per_s=self.session_tokens / self.train_time if self.train_time else 0.0,
            eta_s=per_step * (self.plan.max_steps - s.step) if s.step > self.resumed_at else None,
            step_s=self.last_step[0], step_tokens=self.last_step[1],
        )


def _optimizer_step(run: _Run, stream: Iterator[list[D.Example]]) -> tuple[float, float]:
    """One optimizer step over `accum` micro-batches; returns (mean token loss, learning rate used)."""
    t0 = time.perf_counter()
    tokens_before = run.session_tokens
    window = [next(stream) for _ in range(run.plan.accum)]
    n_labels = max(1, sum(_n_labels(items) for items in window))
    lr = run.sched.get_last_lr()[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)
    budget = PASS_TOKENS.get(run.device.type, PASS_TOKENS["cpu"])
    mine = window if run.world == 1 else [[ex for items in window for ex in items][run.rank::run.world]]
    parts = [part for items in mine for part in _passes(items, budget)]
    real = len(parts)
    if run.sharded:  # every rank runs as many passes (each all-gathers); extra ones weigh nothing
        parts += [[window[0][0]]] * (_max_across_ranks(real, run.device) - real)
    for i, part in enumerate(parts):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in D.to_tensors(part, run.pad_id).items()}
        loss = _token_loss_sum(run.model, batch, run.autocast) / n_labels * (1.0 if i < real else 0.0)
        loss.backward()
        loss_sum += loss.detach()
    for items in window:  # every rank counts the whole window: tokens are global
        run.session_tokens += D.real_tokens(items)
        run.state.tokens += D.real_tokens(items)
    if run.world > 1:
        loss_sum = _sum_across_ranks(run.trainable, loss_sum)
    if run.sharded:
        sharded.clip_grad_norm(run.trainable, MAX_GRAD_NORM)
    else:
        torch.nn.utils.clip_grad_norm_(run.trainable, MAX_GRAD_NORM)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.micro += run.plan.accum
    took = time.perf_counter() - t0
    run.train_time += took
    run.last_step = (took, run.session_tokens - tokens_before)
    return loss_sum.item(), lr  # the one host sync of a step


def _sum_across_ranks(params: list[torch.Tensor], loss_sum: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) the LoRA gradients and the loss in one flat buffer: each rank's part is already
    divided by the window's global label count, so the sum is the single-process gradient. A rank whose
    shard was empty contributes zeros. Returns the global loss. Sharded (FSDP) parameters are left out:
    FSDP has summed their gradients already."""
    import torch.distributed as dist

    params = [p for p in params if not sharded.is_shard(p)]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dtype = grads[0].dtype if grads else torch.float32
    flat = torch.cat([*(g.reshape(-1) for g in grads), loss_sum.reshape(1).to(dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)  # no copy when it is fp32
        offset += p.numel()
    return flat[-1]


def _max_across_ranks(n: int, device: torch.device) -> int:
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _agreed_stop(run: _Run) -> bool:
    """The hooks' cancellation (rank 0 holds the real hooks), agreed by every rank at the same step."""
    stop = run.hooks.should_stop()
    if run.world == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([float(stop)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _eval_and_maybe_stop(run: _Run, lr: float) -> bool:
    """Eval, record it on the current history point, update early stopping; True means stop now."""
    eval_loss = evaluate(run.model, run.val, run.hp.batch_size, run.pad_id, run.device, run.autocast)
    if eval_loss is None:
        return False
    s = run.state
    s.history[-1].eval_loss = eval_loss
    run.hooks.on_step(run.info(s.history[-1].loss, eval_loss, lr))
    if run.hp.early_stopping_patience is None:
        return False
    if s.best_eval is None or eval_loss < s.best_eval:
        s.best_eval, s.bad_evals, run.best = eval_loss, 0, _lora_state(run.model)
        return False
    s.bad_evals += 1
    return s.bad_evals >= run.hp.early_stopping_patience


def _loop(run: _Run, train_set: list[D.Example]) -> tuple[bool, bool]:
    """Run optimizer steps to `max_steps`; returns (cancelled, stopped_early)."""
    s, hp = run.state, run.hp
    stream = _micro_batches(train_set, run.plan, s.micro)
    lr = run.sched.get_last_lr()[0]
    while s.step < run.plan.max_steps:
        if _agreed_stop(run):
            log.info("cancelled before step %d", s.step + 1)
            return True, False
        loss, lr = _optimizer_step(run, stream)
        s.history.append(LossPoint(step=s.step, loss=loss))
        run.hooks.on_step(run.info(loss, None, lr))
        stop = bool(run.val) and s.step % hp.eval_steps == 0 and _eval_and_maybe_stop(run, lr)
        if s.step % hp.save_steps == 0 or stop:
            ckpt = _save_checkpoint(run.out_dir, run.model, run.opt, run.sched, s, run.plan, run.best)
            if ckpt is not None:  # rank 0
                run.hooks.on_checkpoint(ckpt, s.step)
        if stop:
            log.info("early stop at step %d: eval loss did not improve for %d evals", s.step, s.bad_evals)
            return False, True
    if run.val and s.history and s.history[-1].eval_loss is None:
        _eval_and_maybe_stop(run, lr)  # the final eval, so metrics always report one
    return False, False


def _check(hp: Hyperparameters, val: list[D.Example]) -> None:
    if hp.early_stopping_patience is not None and not val:
        raise HyperparameterError("early_stopping_patience",
                                  "needs a validation split (validation_split > 0 and at least 2 rows)")


def train(
    base_dir: Path,
    dataset_path: Path,
    fmt: str,
    hp: Hyperparameters,
    out_dir: Path,
    hooks: TrainHooks,
    resume_dir: Path | None = None,
    prepare: Any = None,
    base: tuple[str, str] | None = None,
) -> TrainResult:
    """Fine-tune `base_dir` with LoRA on `dataset_path`; the adapter ends up in `out_dir/adapter`.

    `resume_dir`: a checkpoint directory (or a folder holding `checkpoints/step-N`): training continues
    at its step with its data position, optimizer, scheduler and RNG states. `prepare`: stands in for
    `data.prepare` (same signature and result; the tuning stage's lint wraps it). Raises `DatasetFormatError`
    for unusable data, `HyperparameterError`/`InvalidInputError` for settings or a foreign checkpoint.
    `base`: (hub repo id, revision) of `base_dir`, written into the adapter instead of the local path.
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    _setup_threads()
    device, dtype = _device()
    _seed_all(hp.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, val = (prepare or D.prepare)(tokenizer, Path(dataset_path), fmt, hp.max_seq_len,
                                            hp.validation_split, hp.seed, hp.packing)
    _check(hp, val)
    plan = _make_plan(hp, len(train_set))
    rank, size = world()
    fsdp = hp.parallel == "fsdp" and size > 1
    model = _load_model(Path(base_dir), hp, device, dtype, on_host=fsdp)
    if size > 1:
        _same_start([p for p in model.parameters() if p.requires_grad], hp.seed, rank, device)
    if fsdp:
        sharded.shard(model, device.type, dtype)
    opt, sched = _optimizer(model, hp, plan)
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    run = _Run(model=model, opt=opt, sched=sched, plan=plan, hp=hp, hooks=hooks, out_dir=out_dir,
               device=device, autocast=autocast, pad_id=pad_id, val=val, state=_State(),
               trainable=[p for p in model.parameters() if p.requires_grad], rank=rank, world=size,
               sharded=fsdp)

    ckpt = find_checkpoint(Path(resume_dir)) if resume_dir is not None else None
    if resume_dir is not None and ckpt is None:
        raise InvalidInputError(f"no checkpoint found in {resume_dir}")
    if ckpt is not None:
        run.state, run.best = _load_checkpoint(ckpt, model, opt, sched, plan)
        run.resumed_at = run.state.step
        log.info("resumed from %s at step %d of %d", ckpt, run.state.step, plan.max_steps)

    model.train()
    cancelled, stopped_early = _loop(run, train_set)
    if run.best is not None:
        _load_lora_state(model, run.best)  # early stopping tracked a best adapter: ship that one
    adapter_dir = out_dir / "adapter"
    whole = sharded.full_trainable(model) if fsdp else None  # a collective: every rank
    if rank == 0:
        _save_adapter(model, tokenizer, Path(base_dir), adapter_dir, base, whole)
    metrics = _metrics(run, ckpt is not None, time.perf_counter() - started)
    return TrainResult(adapter_dir, metrics, list(run.state.history), cancelled, stopped_early)


def _same_start(params: list[torch.Tensor], seed: int, rank: int, device: torch.device) -> None:
    """Every rank starts from rank 0's LoRA weights; then each rank draws its own dropout stream. (Through
    `device`: NCCL sends only GPU tensors, and FSDP's model is still in host memory here.)"""
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            buf = p.data.to(device)
            dist.broadcast(buf, src=0)
            if buf is not p.data:
                p.data.copy_(buf)
    _seed_all(seed + rank)


def _metrics(run: _Run, resumed: bool, duration: float) -> TrainMetrics:
    s = run.state
    losses = [p.loss for p in s.history if p.loss is not None]
    evals = [p.eval_loss for p in s.history if p.eval_loss is not None]
    return TrainMetrics(
        steps=s.step,
        epochs=round(s.micro / run.plan.n_batches, 4),
        train_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,  # last ≤10 steps: less noisy
        eval_loss=s.best_eval if run.best is not None else (evals[-1] if evals else None),
        first_loss=losses[0] if losses else None,
        tokens=s.tokens,
        tokens_per_s=round(run.session_tokens / run.train_time, 2) if run.train_time else 0.0,
        duration_s=round(duration, 3),
        resumed_from_step=run.resumed_at if resumed else None,
    )


# --------------------------------------------------------------------------- reporting helpers


def thin_history(history: list[LossPoint], max_points: int = 500) -> list[LossPoint]:
    """At most ~`max_points` points for an event payload: every eval point plus evenly spaced steps."""
    if len(history) <= max_points:
        return list(history)
    every = math.ceil(len(history) / max_points)
    return [p for i, p in enumerate(history) if p.eval_loss is not None or i % every == 0
            or i == len(history) - 1]


def plot_loss(history: list[LossPoint], path: Path) -> Path:
    """Train (line) and eval (markers) loss vs step as a PNG.

    Uses the object-oriented Agg API, not pyplot: no global state, safe from the handler's worker thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train_pts = [(p.step, p.loss) for p in history if p.loss is not None]
    eval_pts = [(p.step, p.eval_loss) for p in history if p.eval_loss is not None]
    if train_pts:
        ax.plot(*zip(*train_pts, strict=True), label="train loss", linewidth=1.2)
    if eval_pts:
        ax.plot(*zip(*eval_pts, strict=True), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train_pts or eval_pts:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
