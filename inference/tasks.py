"""Celery tasks of the inference app; each only calls a service."""
from celery import shared_task
from celery.signals import worker_ready

from inference import batch_runner, batch_services


@shared_task(ignore_result=True)
def run_batch(batch_id: str) -> None:
    """Run or resume one batch (acks_late: a worker killed mid-job leaves it to be run again)."""
    batch_runner.run_batch(batch_id=batch_id)


@shared_task(ignore_result=True)
def resume_batches() -> int:
    """Re-enqueue unfinished batches (beat, and each worker start): those of dead workers resume."""
    return batch_services.resume_unfinished_batches()


@shared_task(ignore_result=True)
def delete_expired_files() -> int:
    """Delete files past their retention (beat, hourly); they already answer 404."""
    return batch_services.delete_expired_files()


@worker_ready.connect
def _resume_after_start(sender=None, **kwargs) -> None:
    # After the lease of a worker that just died has expired, so its batches are free to take.
    resume_batches.apply_async(countdown=batch_runner.LEASE_S + 1)
