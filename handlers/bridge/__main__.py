"""`python -m handlers.bridge`: serve the bridge with uvicorn on settings.bridge_host:bridge_port.

Options override the settings (`CODETUNE_BRIDGE_HOST`, `CODETUNE_BRIDGE_PORT`). Without
`CODETUNE_BRIDGE_TOKEN` it refuses to bind anything but a loopback address; with a bad
`CODETUNE_WEBHOOK_SECRET` it refuses to start. The access log names paths without their query strings.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from core.settings import get_settings
from handlers.bridge.app import BridgeConfigError, create_app
from handlers.bridge.auth import check_binding


class PathWithoutQuery(logging.Filter):
    """The access log line names the path only: a query string (which may hold a token) is never written."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m handlers.bridge", description=__doc__)
    parser.add_argument("--host", default=settings.bridge_host)
    parser.add_argument("--port", type=int, default=settings.bridge_port)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    check_binding(settings, args.host)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except BridgeConfigError as e:
        raise SystemExit(f"refusing to start the bridge: {e}") from None
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            proxy_headers=False, server_header=False)
    logging.getLogger("uvicorn.access").addFilter(PathWithoutQuery())  # after uvicorn configured logging
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
