"""A single-file Django project: settings, URLs and views in one module, served by Django's own WSGI
handler. No database, no installed apps, no middleware (so no CSRF token is needed for the POST)."""

from django.conf import settings


class URLConf:
    """Django imports ROOT_URLCONF by name when it is a string; a (hashable) object with `urlpatterns`
    works too and does not depend on the name under which the server imported this file."""

    urlpatterns = []


settings.configure(
    DEBUG=False,
    SECRET_KEY="oxwsgi-e2e-tests-only-not-secret",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=URLConf,
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    DATABASES={},
    USE_TZ=True,
)

from django.core.wsgi import get_wsgi_application  # noqa: E402  (needs settings)
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def index(request):
    return JsonResponse(
        {
            "framework": "django",
            "method": request.method,
            "path": request.path,
            "query": {key: request.GET.getlist(key) for key in request.GET},
            "scheme": request.scheme,
            "host": request.get_host(),
        }
    )


def echo(request):
    return JsonResponse(
        {
            "method": request.method,
            "form": {key: request.POST.getlist(key) for key in request.POST},
            "body_length": len(request.body),
        }
    )


URLConf.urlpatterns = [path("", index), path("echo", echo)]

application = get_wsgi_application()
