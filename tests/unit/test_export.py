"""Export: llama.cpp converters install, GGUF conversion of the tiny model (base, LoRA, merged), runtime
equivalence in llama.cpp (xllamacpp), and the chat template → Ollama TEMPLATE translation.

The converters are installed once into `<repo>/.codetune/llama.cpp/` (the default data dir, git-ignored)
so reruns skip the ~6 s sdist download; `CODETUNE_LLAMACPP_DIR` points at an existing checkout instead.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from artifacts import TinyArtifacts, converters_dir, tiny_artifacts  # tests/artifacts.py

from core.errors import ExportError
from handlers.ollama_format.chat_format import STOCK_TEMPLATES, chat_format_from_jinja, ollama_template
from handlers.ollama_format.gotemplate import GoTemplate, TemplateError
from handlers.ollama_format.modelfile import render_modelfile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    return tiny_artifacts(tmp_path_factory.getbasetemp() / "tiny-export")


# --------------------------------------------------------------------------- converters install


def test_ensure_converters_installs_once_and_validates(tmp_path: Path) -> None:
    from core.settings import Settings
    from handlers.export.llamacpp import REQUIRED, ensure_converters, validate_converters

    conv = converters_dir()
    for rel in (*REQUIRED, "models/ggml-vocab-llama-spm.gguf"):
        assert (conv / rel).is_file(), rel
    started = time.monotonic()
    assert converters_dir() == conv
    assert time.monotonic() - started < 1.0  # already installed: no download, no extraction
    # An explicit llama.cpp folder is used as is (validated, never modified).
    assert ensure_converters(Settings(_env_file=None, llamacpp_dir=conv)) == conv
    with pytest.raises(ExportError, match=r"missing convert_hf_to_gguf\.py"):
        validate_converters(tmp_path)


def test_extract_from_a_broken_sdist_fails_cleanly(tmp_path: Path) -> None:
    from handlers.export.llamacpp import extract_converters

    bad = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:  # a valid tar without the vendored converters
        info = tarfile.TarInfo("llama_cpp_python-0.0.0/README.md")
        tar.addfile(info)
    with pytest.raises(ExportError, match="incomplete"):
        extract_converters(bad, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]  # no temp folder left behind


# --------------------------------------------------------------------------- conversion


@pytest.mark.slow
def test_convert_base_adapter_and_merged(tiny: TinyArtifacts) -> None:
    from devkit.gguf_info import read_gguf_info

    base, lora, merged = (read_gguf_info(p) for p in (tiny.base_gguf, tiny.adapter_gguf, tiny.merged_gguf))
    assert base.architecture == "llama" and base.file_type == "F16" and not base.is_adapter
    assert lora.is_adapter and lora.kv.get("adapter.type") == "lora"
    assert merged.n_params == base.n_params
    assert "<|im_start|>" in base.kv["tokenizer.chat_template"]
    assert base.kv["tokenizer.ggml.model"] == "llama"  # the SentencePiece path, also for the merged model
    assert merged.kv["tokenizer.ggml.model"] == "llama"
    assert (tiny.merged_dir / "tokenizer.model").is_file()
    leftovers = [p.name for p in tiny.base_gguf.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _greedy_tokens(model: Path, adapter: Path | None, prompt: str, n: int = 16) -> list[int]:
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(model)
    params.n_ctx = 256
    params.warmup = False
    params.verbosity = -1
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    if adapter:
        params.lora_adapters = [xlc.CommonAdapterLoraInfo(str(adapter), 1.0)]
    server = xlc.Server(params)
    result = server.handle_completions({"prompt": prompt, "max_tokens": n, "temperature": 0.0, "logprobs": 1})
    return [t["id"] for t in result["choices"][0]["logprobs"]["content"]]


@pytest.mark.slow
def test_base_plus_adapter_equals_merged_in_llama_cpp(tiny: TinyArtifacts) -> None:
    pytest.importorskip("xllamacpp")
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    with_adapter = _greedy_tokens(tiny.base_gguf, tiny.adapter_gguf, prompt)
    merged = _greedy_tokens(tiny.merged_gguf, None, prompt)
    base = _greedy_tokens(tiny.base_gguf, None, prompt)
    assert len(with_adapter) == 16
    assert with_adapter == merged
    assert with_adapter != base


@pytest.mark.slow
def test_q8_0_output(tiny: TinyArtifacts, tmp_path: Path) -> None:
    from devkit.gguf_info import read_gguf_info
    from handlers.export.gguf import convert_base

    out = convert_base(tiny.base_dir, tmp_path / "base.q8_0.gguf", "q8_0", converters_dir=tiny.converters)
    assert read_gguf_info(out).file_type == "Q8_0"


@pytest.mark.slow
def test_converter_failure_names_the_error_and_leaves_no_file(tiny: TinyArtifacts, tmp_path: Path) -> None:
    from handlers.export.gguf import convert_base

    broken = tmp_path / "broken"
    shutil.copytree(tiny.base_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out" / "broken.gguf"
    with pytest.raises(ExportError) as err:
        convert_base(broken, out, converters_dir=tiny.converters)
    assert "convert_hf_to_gguf.py failed with exit code" in err.value.message
    assert "Error" in err.value.message  # the converter's own last lines
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_converter_timeout(tiny: TinyArtifacts, tmp_path: Path) -> None:
    from handlers.export.gguf import convert_adapter

    out = tmp_path / "lora.gguf"
    with pytest.raises(ExportError, match=r"timed out after 0\.05 s"):
        convert_adapter(tiny.adapter_dir, tiny.base_dir, out, converters_dir=tiny.converters, timeout_s=0.05)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inputs_are_checked_before_running_anything(tmp_path: Path) -> None:
    from handlers.export.gguf import convert_adapter, convert_base, merge_adapter

    with pytest.raises(ExportError, match="outtype must be one of f16, bf16, q8_0"):
        convert_base(tmp_path, tmp_path / "x.gguf", "q4_k_m", converters_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=r"has no config\.json"):
        convert_base(tmp_path, tmp_path / "x.gguf", converters_dir=tmp_path)
    with pytest.raises(ExportError, match=r"has no adapter_config\.json"):
        convert_adapter(tmp_path, tmp_path, tmp_path / "x.gguf", converters_dir=tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        merge_adapter(tmp_path / "nope", tmp_path, tmp_path / "merged")


# --------------------------------------------------------------------------- chat template → TEMPLATE

LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
ZEPHYR_JINJA = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
QWEN_JINJA = (  # ChatML with a default system prompt when the chat has none (Qwen2.5 style)
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NEMO_JINJA = (  # system prompt merged into the LAST user turn (Mistral-Nemo style)
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST]' + system_message + '\n\n' + message['content']"
    " + '[/INST]' }}{%- else %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token}}{%- endif %}{%- endfor %}"
)

THREE_TURNS = [
    {"role": "system", "content": "You are a geography tutor."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
    {"role": "user", "content": "Which is larger?"},
]


def _hf_render(jinja: str, messages: list[dict[str, str]], bos: str = "<s>", eos: str = "</s>") -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=True,
                                     bos_token=bos, eos_token=eos)
    return texts[0].removeprefix(bos)  # llama.cpp/Ollama add BOS themselves


@pytest.mark.slow
def test_tiny_chatml_tokenizer_gives_ollamas_chatml_template(tiny: TinyArtifacts) -> None:
    from transformers import AutoTokenizer

    template, stop = ollama_template(tiny.base_dir)
    assert template == STOCK_TEMPLATES["chatml"]
    assert template == ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                        "<|im_start|>assistant\n")
    assert stop == ["<|im_end|>", "<|im_start|>"]  # end of turn (also this tokenizer's eos) + turn start
    tok = AutoTokenizer.from_pretrained(tiny.base_dir)
    expected = tok.apply_chat_template(THREE_TURNS, tokenize=False, add_generation_prompt=True)
    assert GoTemplate(template).render_chat(THREE_TURNS) == expected
    # the Modelfile's SYSTEM is prepended by Ollama when the chat has no system message
    assert GoTemplate(template).render_chat(THREE_TURNS[1:], system=THREE_TURNS[0]["content"]) == expected


def test_llama3_gives_ollamas_llama3_template() -> None:
    fmt = chat_format_from_jinja(LLAMA3_JINJA, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert fmt.family == "llama3" and fmt.stock
    assert fmt.template == (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert fmt.stop == ["<|eot_id|>", "<|start_header_id|>"]
    expected = _hf_render(LLAMA3_JINJA, THREE_TURNS, "<|begin_of_text|>", "<|eot_id|>")
    assert GoTemplate(fmt.template).render_chat(THREE_TURNS) == expected
    assert not expected.startswith("<|begin_of_text|>")


@pytest.mark.parametrize(("jinja", "family", "system_mode"), [
    (ZEPHYR_JINJA, "zephyr", "turn"),
    (MISTRAL_JINJA, "mistral", "unsupported"),
    (GEMMA_JINJA, "gemma", "unsupported"),
    (QWEN_JINJA, "chatml", "turn"),
    (NEMO_JINJA, "mistral", "merged_last"),
])
def test_other_families_reproduce_three_turns(jinja: str, family: str, system_mode: str) -> None:
    bos, eos = ("<bos>", "<eos>") if family == "gemma" else ("<s>", "</s>")
    fmt = chat_format_from_jinja(jinja, bos_token=bos, eos_token=eos)
    assert (fmt.family, fmt.system_mode) == (family, system_mode)
    assert eos in fmt.stop
    tmpl = GoTemplate(fmt.template)
    no_system = THREE_TURNS[1:]
    assert tmpl.render_chat(no_system) == _hf_render(jinja, no_system, bos, eos)
    if system_mode != "unsupported":
        assert tmpl.render_chat(THREE_TURNS) == _hf_render(jinja, THREE_TURNS, bos, eos)


def test_zephyr_uses_the_stock_text_and_qwen_keeps_its_default_system() -> None:
    assert chat_format_from_jinja(ZEPHYR_JINJA).template == STOCK_TEMPLATES["zephyr"]
    qwen = chat_format_from_jinja(QWEN_JINJA, bos_token=None, eos_token="<|im_end|>")
    assert not qwen.stock  # the stock chatml template would drop the default system prompt
    # an empty system message is a system turn for this template: the default shows only with no system message
    assert qwen.template.startswith('{{- if or (not .Messages) (not (eq (index $.Messages 0).Role "system")) }}'
                                    "<|im_start|>system\nYou are a helpful assistant.")
    assert qwen.stop == ["<|im_end|>", "<|im_start|>"]


@pytest.mark.parametrize(("jinja", "problem"), [
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "verbatim"),
    ("{% for m in messages | reverse %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{% if loop.first %}<first>{% endif %}[{{ m['role'] }}]{{ m['content'] }}"
     "{% if loop.index == 2 %}<two>{% endif %}{% endfor %}", "differs"),
    ("{{ raise_exception('no') }}", "failed on a u1 conversation"),
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
     "{% else %}<|im_end|>{% endif %}\n{% endfor %}<|im_start|>assistant\n", "looks like chatml"),
])
def test_unrecoverable_templates_raise(jinja: str, problem: str) -> None:
    with pytest.raises(ExportError, match=problem):
        chat_format_from_jinja(jinja)


def test_real_templates_from_llama_cpp_recover_and_verify() -> None:
    """The chat templates llama.cpp ships (Llama 3.1, Phi-3.5, gemma-2, Qwen2.5…): all recover or fail loudly."""
    templates = converters_dir() / "models" / "templates"
    expected = {"meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3", "microsoft-Phi-3.5-mini-instruct.jinja": "phi3",
                "google-gemma-2-2b-it.jinja": "gemma", "Qwen-Qwen2.5-7B-Instruct.jinja": "chatml",
                "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral"}
    for name, family in expected.items():
        fmt = chat_format_from_jinja((templates / name).read_text())
        assert fmt.family == family, name
    recovered = 0
    for path in sorted(templates.glob("*.jinja")):
        try:
            chat_format_from_jinja(path.read_text())
            recovered += 1
        except ExportError:
            pass  # a loud failure is allowed; a wrong template is not (every success was verified)
    assert recovered >= 50


# --------------------------------------------------------------------------- the Go template subset


def test_go_subset_features_and_errors() -> None:
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "N": 2}
    t = GoTemplate('{{- range $i, $m := .Messages }}{{ if $i }},{{ end }}{{ $i }}={{ $m.Role }}:{{ .Content }}'
                   '{{- end }} {{ len .Messages }} {{ (index .Messages 1).Role }} {{ if and .N (eq .N 1 2) }}yes'
                   '{{ else }}no{{ end }} {{ slice "hello" 1 3 }} {{ "x" | printf "%s!" }} {{/* comment */}}')
    assert t.execute(data) == "0=user:a,1=assistant:b 2 assistant yes el x! "
    assert GoTemplate("  a  {{- 1 -}}  b  ").execute({"Response": ""}) == "  a1b  "  # Ollama appends .Response
    legacy = GoTemplate("{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:{{ .Response }}|")
    assert legacy.render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]) \
        == "S:s U:u1 A:a1|U:u2 A:"
    assert GoTemplate("{{ .Prompt }}").render_chat([{"role": "user", "content": "hi"}]) == "hi"
    for bad in ("{{ if .X }}", "{{ end }}", "{{ nosuchfunc 1 }}", "{{ template \"x\" }}", "{{ .X"):
        with pytest.raises(TemplateError):
            GoTemplate(bad)


def test_render_modelfile() -> None:
    text = render_modelfile("/models/base.gguf", "/models/lora.gguf", STOCK_TEMPLATES["chatml"],
                            ["<|im_end|>", "<|im_start|>"], "You are terse.", {"num_ctx": 4096, "temperature": 0.2})
    assert text == (
        "FROM /models/base.gguf\nADAPTER /models/lora.gguf\n"
        f'TEMPLATE """{STOCK_TEMPLATES["chatml"]}"""\nSYSTEM """You are terse."""\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\nPARAMETER num_ctx 4096\n'
        "PARAMETER temperature 0.2\n")
    assert render_modelfile("base", None, "{{ .Prompt }}", [], None, None) == \
        'FROM base\nTEMPLATE """{{ .Prompt }}"""\n'
    with pytest.raises(ExportError):
        render_modelfile(" ", None, "", [], None, None)


def test_converters_env_puts_vendored_gguf_first(tmp_path: Path) -> None:
    from handlers.export.llamacpp import converter_env

    env = converter_env(tmp_path, {"PYTHONPATH": "/x", "NO_LOCAL_GGUF": "1"})
    assert env["PYTHONPATH"] == f"{tmp_path / 'gguf-py'}{os.pathsep}/x"
    assert "NO_LOCAL_GGUF" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_the_gguf_tokenizes_chat_prompts_like_transformers(tiny: TinyArtifacts) -> None:
    """llama.cpp must see the ids the model was trained on: the ChatML markers are CONTROL tokens (split off,
    never spelled out in characters) and no space is prefixed to text after them."""
    from gguf import GGUFReader

    from devkit.tinymodel import IM_END, IM_START

    fields = GGUFReader(tiny.base_gguf).fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    assert types[tokens.index(IM_START)] == control and types[tokens.index(IM_END)] == control
    prefix = fields["tokenizer.ggml.add_space_prefix"]
    assert bool(prefix.parts[prefix.data[0]][0]) is False


def test_rendered_modelfiles_parse_back() -> None:
    """What export writes, serving reads: one module renders and parses Modelfiles."""
    from handlers.ollama_format.modelfile import parse_modelfile

    template = STOCK_TEMPLATES["mistral"]  # quotes, newlines and `{{`
    text = render_modelfile("base.gguf", "lora.gguf", template, ["</s>", "[INST]"], 'Say "hi".\nTwice.',
                            {"num_ctx": 4096, "temperature": 0.2})
    mf = parse_modelfile(text)
    assert (mf.from_, mf.adapter, mf.template, mf.system) == ("base.gguf", "lora.gguf", template, 'Say "hi".\nTwice.')
    assert mf.parameters == {"stop": ["</s>", "[INST]"], "num_ctx": 4096, "temperature": 0.2}
