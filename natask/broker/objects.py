"""The app's Object Store bucket: calls and results too large for ``max_payload`` (claim checks).

JetStream's Object Store splits an object into chunks well under ``max_payload`` (128 KiB each),
so a payload the server would refuse as one message is stored and read back whole. The bucket
expires objects after ``result_ttl`` (a worker that dies before deleting one leaks nothing).
"""

from __future__ import annotations

import nats.js.errors
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from .provision import Provisioning


class Objects(Provisioning):
    _objects: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        """The objects bucket, created on first use."""
        if self._objects is None:
            bucket = self.names.objects_bucket
            try:
                try:
                    self._objects = await self.api(lambda: self.js.object_store(bucket))
                except nats.js.errors.BucketNotFoundError:
                    config = ObjectStoreConfig(bucket=bucket, description="natask: payloads over max_payload",
                                               ttl=self.config.result_ttl, storage=StorageType.FILE,
                                               replicas=self.config.stream_replicas)
                    self._objects = await self.api(lambda: self.js.create_object_store(bucket, config))
            except Exception as e:
                raise self._translate(e, f"$O.{bucket}") from e
        return self._objects

    async def put_object(self, name: str, data: bytes) -> None:
        """Store ``data`` as object ``name`` (replacing one of that name)."""
        store = await self._store()
        try:
            await store.put(name, data)
        except Exception as e:
            self._objects = None  # the bucket may be gone: look it up (or create it) next time
            raise self._translate(e, f"$O.{self.names.objects_bucket}.{name}") from e

    async def get_object(self, name: str) -> bytes | None:
        """Object ``name``'s bytes; None if there is no such object (deleted, expired)."""
        store = await self._store()
        try:
            result = await store.get(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return None
        except nats.js.errors.NotFoundError:  # the bucket was deleted: its objects with it
            self._objects = None
            return None
        except Exception as e:
            raise self._translate(e, f"$O.{self.names.objects_bucket}.{name}") from e
        return result.data or b""

    async def delete_object(self, name: str) -> None:
        """Delete object ``name``; one already gone is no error."""
        store = await self._store()
        try:
            await store.delete(name)
        except nats.js.errors.NotFoundError:
            return
        except Exception as e:
            raise self._translate(e, f"$O.{self.names.objects_bucket}.{name}") from e
