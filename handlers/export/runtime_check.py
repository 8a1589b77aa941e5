"""The exported GGUF (+ adapter GGUF) answering a held-out prompt in a real llama.cpp runtime (xllamacpp).

What Ollama will run is checked before it is published: the prompt is rendered by the very TEMPLATE that
goes into the Modelfile (`ollama_format.gotemplate.GoTemplate`, Ollama's rules), generation is greedy with the
Modelfile's stop list and a token budget, and the answer is compared with transformers' greedy answer for the same
prompt (token ids the tuning stage recorded in the report). Three findings:

- `stopped`: llama.cpp ended at an end-of-generation token or a stop string (`finish_reason == "stop"`),
  not at the budget (`"length"`): a model that "never stops" fails here, before a user meets it;
- `answer`: the text (an empty answer is a finding too);
- `agree_tokens`: how many leading tokens of transformers' answer the GGUF reproduces (a broken conversion,
  a wrong tokenizer or a template that differs from training shows up as 0).

The prompt has no SYSTEM message (the held-out row's own messages), so both runtimes see the same text.
A plain function: no broker, database or bucket.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from events.payloads import EvalSample, RuntimeCheck

log = logging.getLogger("codetune.export.check")


def agreement(expected_ids: list[int], answer: str, tokenizer: Any) -> int:
    """Leading tokens of `expected_ids` whose decoded text is a prefix of `answer`."""
    got = answer.lstrip()
    n = 0
    for k in range(1, len(expected_ids) + 1):
        want = tokenizer.decode(expected_ids[:k], skip_special_tokens=True).lstrip()
        if not got.startswith(want):
            break
        n = k
    return n


def render_prompt(template: str, sample: EvalSample) -> str:
    from handlers.ollama_format.gotemplate import GoTemplate

    if not sample.messages:  # a plain-text job: the row's first words, as the model was trained on text
        return sample.prompt
    return GoTemplate(template).render_chat([m.model_dump() for m in sample.messages], None)


def complete(model_path: Path, adapter_path: Path | None, prompt: str, stop: list[str], budget: int,
             n_ctx: int = 2048, threads: int = 2) -> dict[str, Any]:
    """One greedy completion; returns {text, finish_reason, tokens}."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(model_path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    params.ctx_shift = False
    params.verbosity = -1
    params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(adapter_path), 1.0)] if adapter_path else []
    server = xlc.Server(params)
    try:
        result = server.handle_completions({"prompt": prompt, "max_tokens": budget, "temperature": 0.0,
                                            "stop": list(stop), "stream": False, "cache_prompt": False})
    finally:
        del server
        gc.collect()
    if not isinstance(result, dict) or result.get("error") or not result.get("choices"):
        raise RuntimeError(f"llama.cpp returned no completion: {str(result)[:300]}")
    choice = result["choices"][0]
    return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason") or "",
            "tokens": int((result.get("usage") or {}).get("completion_tokens", 0))}


def check(model_path: Path, adapter_path: Path | None, tokenizer_dir: Path, template: str, stop: list[str],
          sample: EvalSample, budget: int, threads: int = 2) -> RuntimeCheck:
    """Run the held-out `sample`'s prompt through the GGUF; a runtime failure is a finding, not a crash."""
    prompt = render_prompt(template, sample)
    check = RuntimeCheck(prompt=sample.prompt, answer="", finish_reason="error", stopped=False, tokens=0,
                         budget=budget, expected=sample.tuned, compared_tokens=len(sample.tuned_ids))
    try:
        out = complete(model_path, adapter_path, prompt, stop, budget, threads=threads)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # llama.cpp reports load/decode failures as generic runtime errors
        log.warning("GGUF check failed to run: %s", e)
        return check.model_copy(update={"error": f"{type(e).__name__}: {e}"[:2000]})
    return check.model_copy(update={
        "answer": out["text"].strip()[:4000], "finish_reason": out["finish_reason"],
        "stopped": out["finish_reason"] == "stop" and out["tokens"] <= budget, "tokens": out["tokens"],
        "agree_tokens": agreement(sample.tuned_ids, out["text"], tokenizer),
    })
