"""What a Celery user runs in a shell or a web view: calls, a chain and a chord, blocking on results."""

from natask.celery import chain, chord, group

from .tasks import add, mul, whoami, xsum


def run():
    results = {}
    results["add"] = add.delay(4, 4).get(timeout=20)
    results["mul"] = mul.apply_async((3, 4)).get(timeout=20)
    results["chain"] = chain(add.s(2, 2), mul.s(8), add.s(1)).apply_async().get(timeout=20)
    results["chord"] = chord(group(add.s(i, i) for i in range(5)), xsum.s()).apply_async().get(timeout=20)
    results["queue"] = whoami.delay().get(timeout=20)
    results["queue_call"] = whoami.apply_async(queue="math").get(timeout=20)
    return results
