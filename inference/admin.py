"""Django admin for batch jobs and their files: read-only (jobs change only through the API)."""
from django.contrib import admin

from inference.models import Batch, File


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(File)
class FileAdmin(ReadOnlyAdmin):
    list_display = ("id", "tenant", "purpose", "filename", "bytes", "created_at")
    list_filter = ("purpose",)
    search_fields = ("id", "filename", "tenant__name")
    exclude = ("content",)


@admin.register(Batch)
class BatchAdmin(ReadOnlyAdmin):
    list_display = ("id", "tenant", "endpoint", "status", "completed_requests", "failed_requests", "total_requests",
                    "created_at")
    list_filter = ("status", "endpoint")
    search_fields = ("id", "tenant__name")
