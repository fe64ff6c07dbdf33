"""Database reads on the serving path give their connection back to the pool as soon as they are done.

Django gives a request's connection back when the response ends, and a streamed response can last
minutes: one read at its start would hold a pooled connection all that time, and a burst of calls
would drain the pool (psycopg_pool.PoolTimeout after DATABASE_POOL's timeout).
"""
from functools import wraps

from django.db import connection


def release_connection_after(read):
    """`read`, closing this thread's connection (back to the pool) when it returns."""

    @wraps(read)
    def released(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        finally:
            if not connection.in_atomic_block:  # inside a transaction the connection is its owner's
                connection.close()

    return released
