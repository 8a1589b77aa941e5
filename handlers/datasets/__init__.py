"""datasets stage: validate and profile uploaded training files."""

from handlers.datasets.router import router

__all__ = ["router"]
