"""Tuning stage: LoRA fine-tuning of a pulled base model on a validated dataset.

- `data.py`: reads a dataset file through the format registry (`core/formats/`), tokenizes it with assistant-only
  labels, splits off validation, packs or pads batches. No broker imports.
- `recipe.py`: one readable training loop (peft LoRA, AdamW, warmup + schedule, grad accumulation,
  eval, early stopping, resumable checkpoints). No broker imports: the stage handler calls `train()` from
  a worker thread and gets progress, checkpoints and cancellation through `TrainHooks`.
- `distributed.py`: a job's `devices: N` — the same `train()` in N torch.distributed ranks (child
  processes), rank 0 bridged to the handler's `TrainHooks`; kill-safe (process group, PR_SET_PDEATHSIG).
- `sharded.py`: `parallel: fsdp` — FSDP2 sharding of the base across those ranks, checkpoints gathered whole.

Both import torch/transformers only inside functions or their own module, so importing this package is
light; router wiring lives with the handler.
"""
