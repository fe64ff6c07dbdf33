"""The Django project: settings, URL routing and the WSGI/ASGI entry points."""
