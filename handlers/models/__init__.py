"""models stage: pull base models from the Hugging Face hub into the bucket."""

from handlers.models.router import router

__all__ = ["router"]
