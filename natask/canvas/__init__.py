"""Canvas: signatures (a task call as data) and the workflows built from them — chain, group, chord,
``link`` and ``link_error``.

A workflow is *frozen* when it is sent: every task in it gets its id up front, and the parts that
run later travel as plain data inside the messages of the parts that run first (``Envelope.meta``):
``"chain"`` (the steps still to run), ``"chord"`` (chord membership: id, index, size, callback) and
``"errbacks"``; ``Envelope.links`` holds success callbacks. A worker advances the workflow from that
data alone (``on_outcome``), before it stores the finished task's result and acks its message, so a
redelivered message re-publishes the same ids and JetStream's dedupe absorbs them. Chord progress
lives in the KV bucket ``natask_chords_<prefix>``.

``signature`` holds the objects, ``plan`` the pure freeze/expand logic, ``send`` the client side and
``GroupResult``, ``flow`` the worker side.
"""

from .eager import EagerResult
from .send import GroupResult, ResultSet
from .signature import CALL_OPTIONS, Canvas, Signature, chain, chord, chunks, from_dict, group

__all__ = ["CALL_OPTIONS", "Canvas", "EagerResult", "GroupResult", "ResultSet", "Signature", "chain", "chord",
           "chunks", "from_dict", "group"]
