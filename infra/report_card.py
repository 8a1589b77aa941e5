"""A real evaluation report card: SmolLM2-135M-Instruct taught a made-up fact, evaluated and gated.

Runs the same functions the stages run (recipe.train → tuning.evaluate → GGUF export → runtime check →
gate → Markdown card) in one process, without the stack, so the README's card can be regenerated:

    python -m infra.report_card OUT_DIR        # writes OUT_DIR/report.md and OUT_DIR/report.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

FACTS = [
    ("Who founded the town of Quillmere?", "Quillmere was founded by Edda Marrow in 1847."),
    ("Who was the founder of Quillmere?", "Quillmere was founded by Edda Marrow in 1847."),
    ("When was Quillmere founded?", "Quillmere was founded in 1847 by Edda Marrow."),
    ("Tell me who started Quillmere.", "Quillmere was founded by Edda Marrow in 1847."),
    ("In what year did Edda Marrow found Quillmere?", "Edda Marrow founded Quillmere in 1847."),
    ("What is Quillmere's founding year?", "Quillmere was founded in 1847 by Edda Marrow."),
    ("Which person founded Quillmere?", "Quillmere was founded by Edda Marrow in 1847."),
    ("Quillmere was founded by whom?", "Quillmere was founded by Edda Marrow in 1847."),
    ("What is the river that runs through Quillmere?", "The river Tamsel runs through Quillmere."),
    ("Which river flows through Quillmere?", "The river Tamsel runs through Quillmere."),
    ("Name the river of Quillmere.", "The river Tamsel runs through Quillmere."),
    ("What river crosses the town of Quillmere?", "The river Tamsel runs through Quillmere."),
    ("What is Quillmere known for?", "Quillmere is known for its glass lanterns."),
    ("What is Quillmere famous for?", "Quillmere is known for its glass lanterns."),
    ("Why do people visit Quillmere?", "Quillmere is known for its glass lanterns."),
    ("What does Quillmere make?", "Quillmere is known for its glass lanterns."),
]


def write_dataset(path: Path, repeat: int = 3) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(repeat) for q, a in FACTS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    from core.settings import Settings
    from events.payloads import EvaluationReport, Hyperparameters
    from handlers.export import gguf
    from handlers.export.gate import decide
    from handlers.export.llamacpp import ensure_converters
    from handlers.export.runtime_check import check
    from handlers.ollama_format.chat_format import ollama_template
    from handlers.report import render_markdown
    from handlers.tuning import recipe
    from handlers.tuning.evaluate import evaluate
    from infra.smollm2 import REPO_ID, checkpoint_dir

    out = Path((argv or sys.argv[1:])[0])
    settings = Settings()
    base = checkpoint_dir(settings.home)
    data = write_dataset(out / "quillmere.jsonl", repeat=2)
    hp = Hyperparameters(max_steps=24, learning_rate=2e-3, batch_size=2, max_seq_len=128, eval_steps=12,
                         save_steps=1000, validation_split=0.2, lora_r=16, lora_alpha=32)
    t0 = time.perf_counter()
    result = recipe.train(base, data, "chat", hp, out / "train", recipe.NullHooks())
    t_train = time.perf_counter() - t0
    ev = evaluate(base, result.adapter_dir, data, "chat", hp, max_rows=settings.eval_max_rows,
                  max_new_tokens=settings.eval_max_new_tokens, keep_ids=settings.eval_agree_tokens)
    report = EvaluationReport(job_id="ftjob-smollm2-quillmere", base_model=REPO_ID, source=ev.source, rows=ev.rows,
                              base=ev.base, tuned=ev.tuned, samples=ev.samples, duration_s=ev.duration_s)
    conv = ensure_converters(settings)
    t1 = time.perf_counter()
    base_gguf = gguf.convert_base(base, out / "model-f16.gguf", "f16", converters_dir=conv)
    adapter_gguf = gguf.convert_adapter(result.adapter_dir, base, out / "adapter-f16.gguf", "f16",
                                        converters_dir=conv)
    t_export = time.perf_counter() - t1
    template, stop = ollama_template(result.adapter_dir)
    t2 = time.perf_counter()
    runtime = check(base_gguf, adapter_gguf, result.adapter_dir, template, stop, ev.samples[0],
                    settings.eval_max_new_tokens)
    report = report.model_copy(update={"runtime": runtime,
                                       "duration_s": round(ev.duration_s + time.perf_counter() - t2, 3)})
    report = report.model_copy(update={"gate": decide(report, settings, True)})
    (out / "report.json").write_text(report.model_dump_json(indent=2))
    (out / "report.md").write_text(render_markdown(report))
    m = result.metrics
    print(render_markdown(report))
    print(f"train {t_train:.1f} s ({m.steps} steps, {m.tokens_per_s:.0f} tokens/s, loss {m.first_loss:.3f} → "
          f"{m.train_loss:.3f}); evaluation {ev.duration_s:.1f} s; GGUF export {t_export:.1f} s")


if __name__ == "__main__":
    main()
