"""serving stage: publish exported GGUF models to Ollama and answer list / pull / chat requests.

The work lives in `handlers.serving.ollama_ops`: plain async functions over the official
`ollama.AsyncClient`, with Ollama's errors mapped to `CodeTuneError` subclasses.
"""
