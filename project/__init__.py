"""The Django project; importing it loads the Celery app so `shared_task`s bind to it."""
from project.celery import app as celery_app

__all__ = ["celery_app"]
