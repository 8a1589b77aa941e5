"""CodeTune's dev kit: test doubles and demo models, for a source checkout only (the wheel does not ship it).

- `ollama_standin`: an Ollama STAND-IN (Ollama's documented HTTP API over real llama.cpp inference).
- `hub_standin`: a Hugging Face Hub STAND-IN for push and search tests.
- `tinymodel`: a tiny real Llama built locally in seconds, and toy datasets.

Tests, benches and `codetune demo` import it; the stages never do.
"""
