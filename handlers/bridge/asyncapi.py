"""Generate `events/asyncapi.json` (AsyncAPI 3.0) from the stages' FastStream app.

    python -m handlers.bridge.asyncapi            # (re)write events/asyncapi.json
    python -m handlers.bridge.asyncapi --check    # exit 1 if the file drifted from the code

The document comes from `handlers.app.build_app()` with every available stage, under fixed settings
(the server is the default local `nats://127.0.0.1:4222`), so it depends on the code only. A test runs
the check. Generation imports the stage routers; the bridge itself only reads the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).resolve().parents[2] / "events" / "asyncapi.json"
SERVER = "nats://127.0.0.1:4222"


def generate() -> dict[str, Any]:
    from core.settings import Settings
    from handlers.app import available_stages, build_app

    # home=os.devnull: the document must not depend on a local stack's generated NATS users
    fixed = Settings(_env_file=None, nats_url=SERVER, home=Path(os.devnull))
    app = build_app(available_stages(), fixed)
    return app.schema.to_specification().to_jsonable()


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, ensure_ascii=False, sort_keys=True) + "\n"  # stable: no churn from set order


def drifted(path: Path = SPEC_PATH) -> bool:
    try:
        return json.loads(path.read_text()) != generate()
    except FileNotFoundError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the file differs from the code")
    parser.add_argument("--out", type=Path, default=SPEC_PATH)
    args = parser.parse_args(argv)
    if args.check:
        if drifted(args.out):
            print(f"{args.out} is out of date: run `python -m handlers.bridge.asyncapi`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(render(generate()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
