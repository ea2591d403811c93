"""A Django app with tasks (``orders.tasks``, found by ``autodiscover_tasks``) and views that enqueue them."""
