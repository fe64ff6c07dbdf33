"""Django settings, every one of them from the environment.

Variables: DJANGO_DEBUG, DJANGO_SECRET_KEY, DJANGO_ALLOWED_HOSTS, DATABASE_URL,
REDIS_URL, ENGINE_KEY_PREFIX, ENGINE_TIMEOUT_S, METRICS_TOKEN, CELERY_BROKER_URL, CELERY_QUEUE,
BATCH_FILE_MAX_BYTES, BATCH_CONCURRENCY, BATCH_SLICE_S, BATCH_SLOTS_PER_TENANT, WS_AUTH_TIMEOUT_S,
WS_MAX_PER_TENANT, WS_MAX_PER_PROCESS, FILES_MAX_BYTES_PER_TENANT, FILES_MAX_UPLOADS_PER_HOUR,
FILES_RETENTION_DAYS, LOG_LEVEL,
DJANGO_SECURE_SSL_REDIRECT, DJANGO_HSTS_SECONDS, DATABASE_POOL_SIZE, API_KEY_CACHE_S,
USAGE_FLUSH_MS, API_MAX_BODY_BYTES, TOKENIZER_THREADS, WEB_ADMISSION_CONCURRENCY,
DJANGO_TRUST_X_FORWARDED_PROTO (the README lists their defaults). Without DJANGO_SECRET_KEY, only a
DEBUG process starts, with a key derived from the checkout's path, so no secret
is ever committed and sessions survive restarts in development.
"""
import hashlib
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from project.env import env_bool, env_int, env_list, parse_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set DJANGO_SECRET_KEY (or DJANGO_DEBUG=1 for development).")
    SECRET_KEY = "django-insecure-dev-" + hashlib.sha256(str(BASE_DIR).encode()).hexdigest()

# Empty with DEBUG on means localhost only (Django's own rule).
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS")

INSTALLED_APPS = [
    "daphne",  # first, so `runserver` serves ASGI (SSE and websockets)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "tenants",
    "inference",
]

# Under ASGI (daphne) each of these runs as its twin in project.middleware: the same class, with its
# hooks that do no I/O on the event loop instead of a thread hand-off each.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": parse_database_url(
        os.environ.get("DATABASE_URL", "sqlite:///db.sqlite3"), base_dir=BASE_DIR
    ),
}
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # Under ASGI each concurrent request's database work runs in a thread of its own, with a
    # connection of its own: a pool caps them (200 concurrent calls would exhaust PostgreSQL).
    DATABASES["default"]["OPTIONS"].setdefault(
        "pool", {"min_size": 1, "max_size": env_int("DATABASE_POOL_SIZE", default=20), "timeout": 30})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Where Django and the engine meet: request streams, token deltas, rate-limit counters.
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
ENGINE_KEY_PREFIX = os.environ.get("ENGINE_KEY_PREFIX", "llm")  # must match `engine serve --key-prefix`
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")  # when set, /metrics wants `Bearer <token>`
# Without a token /metrics answers only with DEBUG on (403 otherwise): it names tenants and their volumes.
# The largest request body (413 beyond it); batch file uploads get BATCH_FILE_MAX_BYTES instead.
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", default=8 * 1024 * 1024)
# Threads per web process that tokenize prompts and render chat templates, off the event loop.
TOKENIZER_THREADS = env_int("TOKENIZER_THREADS", default=4)
# Calls of one web process admitted at once (authentication to admission), the others waiting their
# turn in arrival order (inference.admission_gate). 16 made a burst's first calls reach the engine
# sooner but lowered the H200 serving figure (1000 streams at once over 8 workers: 0.889 of offline
# with 16, 0.936 with 1024, same machine; benchmarks/RESULTS.md), so the default only bounds a burst.
WEB_ADMISSION_CONCURRENCY = env_int("WEB_ADMISSION_CONCURRENCY", default=1024)
ENGINE_TIMEOUT_S = env_int("ENGINE_TIMEOUT_S", default=600)  # a request's deadline in the engine
# The serving path needs no database: keys are cached (changes invalidate them at once, via Redis),
# usage events are buffered in Redis and written in batches (tenants.key_cache, tenants.usage_buffer).
API_KEY_CACHE_S = env_int("API_KEY_CACHE_S", default=30)  # the longest a process trusts a cached key
USAGE_FLUSH_MS = env_int("USAGE_FLUSH_MS", default=500)  # how often buffered usage events are written

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_ACKS_LATE = True  # a worker that dies mid-task leaves the task for another
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# One queue per Redis namespace, so workers only take jobs of the engines they can reach.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", f"{ENGINE_KEY_PREFIX}-tasks")
CELERY_BEAT_SCHEDULE = {
    "roll-up-usage": {"task": "tenants.tasks.roll_up_recent_usage", "schedule": 300.0},
    "resume-batches": {"task": "inference.tasks.resume_batches", "schedule": 60.0},
    "delete-expired-files": {"task": "inference.tasks.delete_expired_files", "schedule": 3600.0},
}

# Batch API: upload size cap, lines in flight per batch, and how far below interactive calls they run.
BATCH_FILE_MAX_BYTES = env_int("BATCH_FILE_MAX_BYTES", default=100 * 1024 * 1024)
BATCH_CONCURRENCY = env_int("BATCH_CONCURRENCY", default=16)
BATCH_PRIORITY_OFFSET = 10  # engine priority: lower runs first
# Fairness between tenants: a worker runs a batch for one slice, then queues it again behind the
# others; a tenant runs at most this many batches at once (inference.lease_semaphore).
BATCH_SLICE_S = env_int("BATCH_SLICE_S", default=30)
BATCH_SLOTS_PER_TENANT = env_int("BATCH_SLOTS_PER_TENANT", default=1)

# Websockets (/v1/ws): authenticate within this long, and at most this many open per tenant and per process.
WS_AUTH_TIMEOUT_S = env_int("WS_AUTH_TIMEOUT_S", default=5)
WS_MAX_PER_TENANT = env_int("WS_MAX_PER_TENANT", default=16)
WS_MAX_PER_PROCESS = env_int("WS_MAX_PER_PROCESS", default=1000)
# Files: storage per tenant, uploads per tenant per hour, and how long a file lives (batch outputs too).
FILES_MAX_BYTES_PER_TENANT = env_int("FILES_MAX_BYTES_PER_TENANT", default=1024 * 1024 * 1024)
FILES_MAX_UPLOADS_PER_HOUR = env_int("FILES_MAX_UPLOADS_PER_HOUR", default=100)
FILES_RETENTION_DAYS = env_int("FILES_RETENTION_DAYS", default=30)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],  # API views name theirs; the admin uses sessions
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_PARSER_CLASSES": ["inference.json_parsing.OrjsonParser"],  # no RecursionError, no lone surrogates
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "inference.errors.openai_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM inference service",
    "DESCRIPTION": "OpenAI-compatible completions and chat completions over REST and SSE.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Several request objects have a `type` field with its own choices: one named enum for each.
    "ENUM_NAME_OVERRIDES": {
        "ContentPartTypeEnum": ["text"],
        "ToolTypeEnum": ["function"],
        "ResponseFormatTypeEnum": ["text", "json_object", "json_schema"],
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # Each request once: Django's defaults give "django" a console handler of its own (runserver's
    # access lines and django.request's printed twice), and django.request's 4xx warnings repeat the
    # access log (5xx errors stay: they carry the traceback).
    "loggers": {"django": {"handlers": [], "level": os.environ.get("LOG_LEVEL", "INFO"), "propagate": True},
                "django.request": {"level": "ERROR"}},
}

# Production hardening (`manage.py check --deploy` is clean with DEBUG off). X-Forwarded-Proto is
# trusted only when DJANGO_TRUST_X_FORWARDED_PROTO says a proxy sets it (any client can send it).
if env_bool("DJANGO_TRUST_X_FORWARDED_PROTO"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = not DEBUG

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
