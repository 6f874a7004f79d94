import os
import sys

from django.http import JsonResponse
from django.shortcuts import render


def home(request):
    return render(request, "pages/home.html", {"scheme": request.scheme})


def server(request):
    """What the page's script fetches: which process served it, and how it was reached."""
    return JsonResponse(
        {
            "pid": os.getpid(),
            "worker": os.environ.get("OXWSGI_WORKER_ID"),
            "python": sys.version.split()[0],
            "secure": request.is_secure(),
            "host": request.get_host(),
        }
    )
