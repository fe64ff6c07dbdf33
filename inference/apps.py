"""App registration for inference."""
from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        from inference import openapi  # noqa: F401  (registers the schema extension)
