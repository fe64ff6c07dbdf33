"""Batch jobs: uploaded files, batches, and one row per input line that carries its result.

A `BatchLine` is written the moment its request finishes, so a worker killed mid-job resumes
from the lines that have no result yet: nothing is redone and nothing is lost.
"""
import secrets

from django.db import models

from tenants.models import ApiKey, Tenant


def _file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def _batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class FilePurpose(models.TextChoices):
    BATCH = "batch", "Batch input"
    BATCH_OUTPUT = "batch_output", "Batch output"
    BATCH_ERROR = "batch_error", "Batch errors"  # OpenAI calls it batch_output too; kept apart here


class File(models.Model):
    """An uploaded or generated JSONL file, stored in the database (one row, no shared disk needed)."""

    id = models.CharField(primary_key=True, max_length=40, default=_file_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="files")
    purpose = models.CharField(max_length=20, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField()
    content = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # Past this the file answers 404 and a beat task deletes it (FILES_RETENTION_DAYS); null: never.
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINISHED_STATUSES = (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


class Batch(models.Model):
    """One JSONL file of requests run offline at batch priority (OpenAI's Batch API)."""

    id = models.CharField(primary_key=True, max_length=40, default=_batch_id, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="batches")
    # The key the lines run under (its limits and model allowlist); kept when the key is deleted.
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="batches")
    endpoint = models.CharField(max_length=50)  # "/v1/chat/completions" or "/v1/completions"
    # No database constraint: deleting the input file (as OpenAI allows) keeps `input_file_id`.
    input_file = models.ForeignKey(File, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    output_file = models.ForeignKey(File, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    error_file = models.ForeignKey(File, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    completion_window = models.CharField(max_length=10, default="24h")
    status = models.CharField(max_length=20, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    total_requests = models.PositiveIntegerField(default=0)
    completed_requests = models.PositiveIntegerField(default=0)
    failed_requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    metadata = models.JSONField(null=True, blank=True)
    errors = models.JSONField(null=True, blank=True)  # [{"code", "message", "param", "line"}] when the job fails
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES


class BatchLine(models.Model):
    """One input line: its request (null when the line is invalid) and, once done, its output line."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    index = models.PositiveIntegerField()  # 0-based line number among the file's non-blank lines
    custom_id = models.CharField(max_length=512, null=True, blank=True)
    body = models.JSONField(null=True, blank=True)
    # OpenAI's output line ({"id", "custom_id", "response", "error"}); null until the line is done.
    result = models.JSONField(null=True, blank=True)
    succeeded = models.BooleanField(null=True)  # null until done; false lines go to the error file

    class Meta:
        ordering = ["batch", "index"]
        constraints = [models.UniqueConstraint(fields=["batch", "index"], name="batch_line_unique")]

    def __str__(self) -> str:
        return f"{self.batch_id}[{self.index}]"
