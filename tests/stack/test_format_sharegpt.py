"""The `sharegpt` format (core/formats/sharegpt.py): checked alike by both stages, validated and profiled
by the datasets stage on the real stack, and trained on its `gpt` turns only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from events import subjects as sj
from handlers.tuning import data as D
from infra.flows import upload_dataset
from storage.documents import Dataset
from tests.unit.test_formats import judge_both


def turn(who: str, value: Any) -> dict[str, Any]:
    return {"from": who, "value": value}


CONVERSATIONS = [
    [turn("system", "Be brief."), turn("human", "Capital of Peru?"), turn("gpt", "Lima."),
     turn("human", "Thanks!"), turn("gpt", "You are welcome.")],
    [turn("user", "Capital of Chile?"), turn("assistant", "Santiago.")],  # the role-name aliases
    [turn("human", "Say nothing"), turn("gpt", ""), turn("human", "Now say hi"), turn("gpt", "hi")],
]


@pytest.mark.parametrize(("row", "error"), [
    ({"conversations": CONVERSATIONS[0]}, None),
    ({"conversations": CONVERSATIONS[1]}, None),
    ({"conversations": [turn("human", "q"), turn("system", "late"), turn("gpt", "a")]},
     "conversations[1]: a system message may only come first"),
    ({"conversations": [turn("human", "only a question")]}, "no assistant message: nothing to learn from this example"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"conversations": {"from": "human"}}, "'conversations' must be a non-empty list"),
    ({"conversations": ["hi"]}, "conversations[0] must be an object"),
    ({"conversations": [turn("bot", "x")]},
     "conversations[0].from must be one of ['assistant', 'gpt', 'human', 'system', 'tool', 'user'], got 'bot'"),
    ({"conversations": [turn("human", "q"), {"from": "gpt"}]}, "conversations[1].value must be a string"),
])
def test_both_stages_judge_sharegpt_rows_alike(tmp_path: Path, row: dict[str, Any], error: str | None) -> None:
    assert judge_both(tmp_path, "sharegpt", json.dumps(row)) == (error, error)


def _dataset(tmp_path: Path) -> Path:
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return path


@pytest.mark.usefixtures("workers")
async def test_the_datasets_stage_detects_and_profiles_sharegpt(settings, store, tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    subject, answer = await upload_dataset(settings, path, None, "auto", True, 30)
    assert subject == sj.DATASET_VALIDATED
    p = answer.profile
    assert (p.format, p.rows, p.bytes) == ("sharegpt", 3, path.stat().st_size)
    assert p.roles == {"system": 1, "user": 5, "assistant": 5}  # human/user → user, gpt/assistant → assistant
    assert p.chars == sum(len(t["value"]) for c in CONVERSATIONS for t in c)
    assert [(w.code, w.lines) for w in p.warnings] == [("empty_assistant_turns", [3])]
    doc = await Dataset.find_one(Dataset.dataset_id == answer.dataset_id)
    assert doc is not None and doc.status == "validated" and doc.format == "sharegpt"
    assert await store.get_bytes(answer.key) == path.read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": CONVERSATIONS[1]}) + "\n"
                   + json.dumps({"conversations": [turn("human", "q"), turn("robot", "a")]}) + "\n")
    subject, failed = await upload_dataset(settings, bad, None, "sharegpt", True, 30)
    assert subject == sj.DATASET_FAILED
    assert [(e.line, e.message.split(" must")[0]) for e in failed.line_errors] == [(2, "conversations[1].from")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from devkit.tinymodel import build_tiny_llama

    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


def test_training_examples_learn_only_the_gpt_turns(tok: Any, tmp_path: Path) -> None:
    rows = D.read_rows(_dataset(tmp_path), "sharegpt")
    examples = D.tokenize_rows(tok, rows, 512)
    trained = [tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != D.IGNORE_INDEX])
               for ex in examples]
    assert trained == ["Lima.<|im_end|>\nYou are welcome.<|im_end|>\n", "Santiago.<|im_end|>\n",
                       "<|im_end|>\nhi<|im_end|>\n"]  # an empty gpt turn still learns to stop
    first = examples[0]
    prompt = tok.decode([t for t, lab in zip(first.input_ids, first.labels, strict=True) if lab == D.IGNORE_INDEX])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru?<|im_end|>\n"
                      "<|im_start|>assistant\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    chat = [{"role": {"system": "system", "human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
            for t in CONVERSATIONS[0]]
    assert first.input_ids == tok.apply_chat_template(chat, return_dict=False)  # rendered as the model is prompted
