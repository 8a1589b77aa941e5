"""FSDP2 for a job's `parallel: fsdp`: the frozen base sharded across the ranks, LoRA trained as with DDP.

`shard(model)` applies `torch.distributed.fsdp.fully_shard` to each decoder layer, then to the decoder (the
module `loss.token_loss_sum` calls, so it is FSDP's root); the LM head stays whole in every rank, as the
chunked loss multiplies by its weight outside any module's forward (tied embeddings stay whole with it).
Each rank then keeps 1/N of every other weight (base and LoRA) and gathers a layer only while it runs.

FSDP reduce-scatters the gradients itself, as a plain sum (the recipe divides each rank's loss by the
window's global label count, so the sum is the single-process gradient). Every rank must run the same
number of forward passes (each one all-gathers), so the recipe pads a short rank with zero-weight passes.

Checkpoints keep the DDP format: the LoRA weights and the optimizer state are gathered whole
(`full_tensor()`, a collective every rank joins) and rank 0 writes them; loading scatters whole tensors
back into this rank's shards. So a job resumes under either mode and any N, and export reads the same
adapter.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def shard(model: Any, device_type: str, dtype: torch.dtype) -> None:
    """Shard `model` (a peft model over a transformers causal LM) across the default process group.

    On a GPU the layers gather in `dtype` (the bf16 base and peft's fp32 LoRA weights of a layer travel as
    one buffer, which FSDP needs of one dtype) and reduce gradients in fp32; on the CPU all is fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from handlers.tuning.loss import causal_lm

    lm = causal_lm(model)
    decoder = lm.get_decoder()
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    units = [*decoder.layers, decoder]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if device_type != "cpu" else None
    kw: dict[str, Any] = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for unit in decoder.layers:
        fully_shard(unit, **kw)
    head = lm.get_output_embeddings()
    fully_shard(decoder, ignored_params=set(head.parameters()) if head is not None else None, **kw)
    if head is not None and device_type != "cpu":
        head.to(mesh.device_type)  # whole in every rank, on its device (fully_shard moved the rest)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already divided globally
        unit.set_force_sum_reduction_for_comms(True)  # SUM, not PREMUL_SUM (which gloo lacks)


def is_shard(t: Any) -> bool:
    """A sharded (FSDP) tensor: FSDP reduces its gradient itself. (No import: a process that never loaded
    torch.distributed.tensor, half a second of imports, has no DTensor.)"""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(model: Any) -> bool:
    return any(is_shard(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (a collective); a plain tensor as it is."""
    return cast("DTensor", t).full_tensor() if is_shard(t) else t


def full_trainable(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole, on the CPU, by its name in `model` (every rank must call it)."""
    return {n: full(p.detach()).to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy whole tensors (by name in `model`) into the trainable parameters' shards; returns missing names."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            p.copy_(_like(value, p))
    return missing


def _like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`value` (whole) as `p` holds it: this rank's shard of it when `p` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    return value.to(p.device, p.dtype)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` with every sharded state tensor whole: the format a DDP run saves."""
    sd = opt.state_dict()
    sd["state"] = {i: {k: full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After `opt.load_state_dict(whole state)`: turn each sharded parameter's state into its shards."""
    from torch.distributed.tensor import DTensor

    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = _like(v, p)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` over sharded and whole gradients alike (the global L2 norm)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    device = grads[0].device
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq)  # every rank holds a disjoint part of each sharded gradient
    for g in whole:
        sq += g.float().pow(2).sum()  # already summed across ranks: the same in every rank
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    for g in sharded + whole:
        g.mul_(coef.to(g.dtype))
