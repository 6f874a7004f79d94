"""Settings of the example site: what a small production Django project served by oxwsgi behind nginx
needs, and nothing more. No database: the example has no models.

Values that differ per machine come from the environment (set them with `env = ...` in oxwsgi.ini or
`Environment=` in the systemd unit), with defaults that work for a local try-out."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-set-DJANGO_SECRET_KEY-in-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "pages",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "mysite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES = {}
USE_TZ = True

# nginx serves /static/ straight from STATIC_ROOT (`location /static/ { alias ...; }`): run
# `python3 manage.py collectstatic --noinput` after each deploy. Django never serves them here.
STATIC_URL = "/static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", BASE_DIR / "staticfiles"))

# nginx passes HTTPS=on when it terminates TLS (uwsgi_params), and oxwsgi sets wsgi.url_scheme from it:
# request.is_secure() is right without SECURE_PROXY_SSL_HEADER.
