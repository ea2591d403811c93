"""The example's URLs."""

from django.urls import path
from orders import views

urlpatterns = [
    path("add", views.add_numbers),
    path("orders", views.place_order),
    path("result/<str:task_id>", views.result),
]
