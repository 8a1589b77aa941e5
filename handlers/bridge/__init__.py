"""The webhook bridge: HTTP → events, and the seed's REST API (`/api/v1/...`) over the same events.

    python -m handlers.bridge                 # uvicorn on settings.bridge_host:bridge_port
    uvicorn --factory handlers.bridge.app:create_app
    python -m handlers.bridge.asyncapi [--check]   # regenerate / check events/asyncapi.json

Why FastAPI on plain nats-py (and not AsgiFastStream + hand-written routes): the bridge is an HTTP service
first. FastAPI (pinned `fastapi==0.165.0`, which brings Starlette) gives, for free, what the routes need and
AsgiFastStream's bare ASGI handlers do not have: typed request models with 422 field errors in the
`{"detail": [...]}` shape the web client already reads, a generated OpenAPI page with bearer security,
streamed request bodies (a multipart upload goes to S3 in constant memory; a body limit answers 413
mid-read), and Server-Sent Events with keep-alive pings. The bridge subscribes to no JetStream consumer,
so a FastStream broker would add nothing: it publishes and requests through `events.client.CodeTuneClient`
(the contract's own typed client) and relays progress with a core-NATS subscription. The pipeline's
AsyncAPI document is generated from `handlers.app.build_app()` into `events/asyncapi.json` and served
read-only at `/asyncapi`; there is no try-it-out endpoint that would publish to the real broker.

Security (see `auth.py`, `signatures.py`):
- the bearer token `CODETUNE_BRIDGE_TOKEN` guards every route but health and the docs pages; without a
  token the bridge refuses to start unless it binds a loopback address (and refuses requests arriving on
  a non-loopback address);
- `POST /events/{subject}` is authenticated by the webhook's HMAC-SHA256 signature when
  `CODETUNE_WEBHOOK_SECRET` is set (webhook senders such as GitHub cannot add an Authorization header,
  and the HMAC also authenticates the body); with no secret it takes the bearer token like the rest.

Nothing here imports torch or transformers (a test asserts it), so the bridge starts in well under a second.
"""
