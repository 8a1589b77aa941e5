"""ollama stage: answer the core-NATS `ollama.*` requests (list, pull, show, delete, chat, create).

Always on: a core-NATS request with no responder fails at once ("no responders"), it does not wait in a
stream for a worker to start. The Ollama client code is shared with the serving stage in
`handlers.ollama_ops`.
"""
