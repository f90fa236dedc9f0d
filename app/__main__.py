"""`python -m app` and `llm-queue-gateway`: read the settings and serve."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

from app.fleet.config import BackendsFileError
from app.limits.keys import KeysFileError
from app.logs import configure_logging
from app.main import create_app
from app.server import GatewayServer
from app.settings import SettingsError, load_settings, unknown_variables

log = logging.getLogger("app.settings")


def serve(app: FastAPI) -> None:
    """Run the app until SIGINT or SIGTERM."""
    GatewayServer(app).run()


def run(**overrides: object) -> None:
    """Read the settings (flags in `overrides` win over the environment) and serve; a bad one exits 2."""
    try:
        settings = load_settings(**overrides)
        app = create_app(settings)
    except (SettingsError, KeysFileError, BackendsFileError) as exc:
        print(f"llm-queue-gateway: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    for name, meant in unknown_variables():
        log.warning(".env sets %s, which no setting reads: did you mean %s?", name, meant)
    serve(app)


def main() -> None:
    """Entry point of `python -m app`: serve with the settings of the environment."""
    run()


if __name__ == "__main__":
    main()
