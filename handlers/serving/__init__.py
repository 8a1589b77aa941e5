"""serving stage: publish exported GGUF models to Ollama (`model.exported` → `model.published`).

The Ollama calls live in the shared `handlers.ollama_ops` (plain async functions over the official
`ollama.AsyncClient`, with Ollama's errors mapped to `CodeTuneError` subclasses); the `ollama.*`
request-reply subjects are the `ollama` stage's.
"""
