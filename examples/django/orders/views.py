"""Views that enqueue tasks: at once (``delay``) or when the database transaction commits
(``delay_on_commit``: the worker never looks for rows that are not committed yet)."""

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from proj.celery import app

from .tasks import add, send_receipt


def add_numbers(request: HttpRequest) -> JsonResponse:
    result = add.delay(int(request.GET["x"]), int(request.GET["y"]))
    return JsonResponse({"task_id": result.id}, status=202)


def place_order(request: HttpRequest) -> JsonResponse:
    order = request.GET.get("order", "A-1")
    with transaction.atomic():
        # ... save the order here ...
        send_receipt.delay_on_commit(order)  # sent after the commit below, never on a rollback
    return JsonResponse({"order": order}, status=201)


def result(request: HttpRequest, task_id: str) -> JsonResponse:
    handle = app.AsyncResult(task_id)
    state = handle.state
    return JsonResponse({"state": state, "result": handle.result if state == "SUCCESS" else None})

