"""Ollama's formats, shared by the export stage (which writes them) and the serving stage (which reads them).

Not a stage: no handlers, no records, no bus. It lives under `handlers/` beside the stages because both
export and serving need it and neither may reach into the other; it depends only on `events` (errors).

- `gotemplate` (+ `gotemplate_parse`, `gotemplate_funcs`): the Go text/template subset of Ollama TEMPLATEs.
- `chat_format` (+ `chat_parts`): a tokenizer's jinja chat template → an Ollama TEMPLATE and stop list.
- `modelfile`: rendering and parsing Modelfiles.
"""
