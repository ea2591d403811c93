"""Canvas: signatures (a task call as data) and the workflows built from them — chain, group, chord,
``link`` and ``link_error``.

A workflow is *frozen* when it is sent: every task in it gets its id up front, and the parts that
run later travel as plain data inside the messages of the parts that run first (``Envelope.meta``):
``"chain"`` (the steps still to run), ``"chord"`` (chord membership: id, index, size, callback) and
``"errbacks"``; ``Envelope.links`` holds success callbacks. A worker advances the workflow from that
data alone (``natask.worker.flow``), before it stores the finished task's result and acks its message, so a
redelivered message re-publishes the same ids and JetStream's dedupe absorbs them. Chord progress
lives in the KV bucket ``natask_chords_<prefix>``.

``signature`` holds the objects, ``plan`` the pure freeze/expand logic, ``send`` the client side and
``GroupResult``; the worker side is ``natask.worker.flow``.
"""

from .plan import Freezer, Node, Step, derived_id, expand, leaves, walk
from .send import GroupResult, launch, result_of
from .signature import CALL_OPTIONS, Canvas, Signature, chain, chord, from_dict, group

__all__ = [
    "CALL_OPTIONS",
    "Canvas",
    "Freezer",
    "GroupResult",
    "Node",
    "Signature",
    "Step",
    "chain",
    "chord",
    "derived_id",
    "expand",
    "from_dict",
    "group",
    "launch",
    "leaves",
    "result_of",
    "walk",
]
