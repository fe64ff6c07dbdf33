#!/usr/bin/env python
"""Django's command-line entry point (migrate, runserver, check, ...); see project/manage.py."""
from project.manage import main

if __name__ == "__main__":
    main()
