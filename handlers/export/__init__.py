"""export stage: LoRA adapter / merged model → GGUF (llama.cpp's converters) + an Ollama Modelfile.

The work lives in plain functions with no broker, database or bucket imports:
`handlers.export.gguf` (convert_base, convert_adapter, merge_adapter) and `handlers.export.modelfile`
(ollama_template, render_modelfile, and a small interpreter for Ollama's Go-template subset).
"""
