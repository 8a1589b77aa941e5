"""`python -m handlers.bridge`: serve the bridge with uvicorn on settings.bridge_host:bridge_port.

Options override the settings (`CODETUNE_BRIDGE_HOST`, `CODETUNE_BRIDGE_PORT`). Without
`CODETUNE_BRIDGE_TOKEN` it refuses to bind anything but a loopback address.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from handlers.bridge.app import create_app
from handlers.bridge.auth import check_binding
from infra.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m handlers.bridge", description=__doc__)
    parser.add_argument("--host", default=settings.bridge_host)
    parser.add_argument("--port", type=int, default=settings.bridge_port)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    check_binding(settings, args.host)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
