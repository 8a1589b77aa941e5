"""export stage: LoRA adapter / merged model → GGUF (llama.cpp's converters) + an Ollama Modelfile.

The work lives in plain functions with no broker, database or bucket imports:
`handlers.export.gguf` (convert_base, convert_adapter, merge_adapter); the TEMPLATE and the Modelfile come
from `handlers.ollama_format` (shared with serving: `chat_format.ollama_template`, `modelfile.render_modelfile`).
"""
