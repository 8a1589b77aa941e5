#!/usr/bin/env bash
# One-command GPU check: our recipe vs Trainer+peft vs TRL SFTTrainer+peft on SmolLM2-135M, bf16 + SDPA.
#
# Prints, per run: tokens/s, peak GPU memory (torch.cuda.max_memory_allocated), TFLOP/s and MFU
# (6·params + 12·L·H·S FLOPs per token against the card's bf16 dense peak; GPU_PEAK_TFLOPS=... overrides),
# and the ratios of ours against each reference (bench/bench_tuning.py does the runs, one process each).
#
#   bash bench/gpu_check.sh --fetch     # here, with network: wheels + SmolLM2 into .gpucheck/ (git-ignored)
#   bash bench/gpu_check.sh             # on the GPU machine (python3 with a CUDA torch, no network needed)
#   bash bench/gpu_check.sh --dry-run   # here, on CPU: the same steps with .venv's python and 16 rows
#
# The GPU machine needs only python3 with torch, transformers, peft and accelerate; everything else
# (trl, datasets, pydantic, ...) travels as wheels in .gpucheck/wheels and installs into a temp folder.
# SmolLM2's real weights (~270 MB) do not fit a small transfer, so .gpucheck/smollm2 holds its config and
# tokenizer; when no weights are there, a random-weight model of exactly that shape is built on the spot
# (speed, memory and MFU depend on the shapes, not on the values). Extra arguments go to bench_tuning.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpucheck
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5)
mode=run
case "${1:-}" in --fetch|--dry-run) mode=${1#--}; shift ;; esac

if [[ $mode == fetch ]]; then
  mkdir -p "$DIR/wheels" "$DIR/smollm2"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR/wheels" "${WHEELS[@]}"
  # SmolLM2's config + tokenizer from the project's own cached conversion (infra/smollm2.py)
  PYTHONPATH=$PWD .venv/bin/python - "$DIR/smollm2" <<'EOF'
import shutil, sys
from pathlib import Path
from infra.smollm2 import checkpoint_dir
src, dst = checkpoint_dir(Path(".codetune")), Path(sys.argv[1])
for f in src.iterdir():
    if f.suffix != ".safetensors":
        shutil.copyfile(f, dst / f.name)
print(f"{dst}: {sorted(p.name for p in dst.iterdir())}")
EOF
  du -sh "$DIR"
  echo "now run on the GPU machine (carry $DIR): bash bench/gpu_check.sh"
  exit 0
fi

if [[ $mode == dry-run ]]; then
  PY=.venv/bin/python
  SITE=""
  set -- --rows 16 "$@"
else
  PY=${PYTHON:-python3}
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
  SITE=$(mktemp -d /tmp/gpucheck-site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$DIR"/wheels/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  set -- --rows 4096 "$@"  # a GPU needs more than 256 rows to time anything
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$PY" -c 'import torch, transformers, peft, trl; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)'

MODEL=$DIR/smollm2
if [[ ! -f $MODEL/model.safetensors ]]; then
  MODEL=$(mktemp -d /tmp/gpucheck-model.XXXX)
  "$PY" - "$DIR/smollm2" "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name not in ("config.json", "generation_config.json"):
        shutil.copyfile(f, dst / f.name)
print(f"random-weight {model.config.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")
EOF
fi
"$PY" bench/bench_tuning.py --model smollm2 --model-path "$MODEL" --variants ours,reference,trl "$@"
