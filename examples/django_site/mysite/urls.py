from django.urls import path

from pages import views

urlpatterns = [
    path("", views.home, name="home"),
    path("api/server", views.server, name="server"),
]
