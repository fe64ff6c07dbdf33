"""URL routes of the inference app."""
from django.urls import path

from inference.apis import HealthApi

urlpatterns = [
    path("health", HealthApi.as_view(), name="health"),
]
