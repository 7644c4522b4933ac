"""A blocking front for aiocoap (asyncio) in tests: its event loop runs in a thread of its own.

The test process is not monkey-patched, but aiocoap still gets its own loop and thread so a test
reads as plain calls: ``client.request("POST", uri, payload)`` returns the aiocoap response.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import aiocoap
from aiocoap import Message

WAIT = 15.0


class CoapTestClient:
    """One aiocoap client context on a private event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aiocoap", daemon=True)
        self.thread.start()
        self.context = self.run(aiocoap.Context.create_client_context())

    def run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(
        self,
        method: str,
        uri: str,
        payload: bytes = b"",
        content_format: int | None = None,
        mtype: Any = None,
        timeout: float = WAIT,
    ) -> aiocoap.Message:
        async def go() -> aiocoap.Message:
            msg = Message(code=getattr(aiocoap, method), uri=uri, payload=payload)
            if mtype is not None:
                msg.mtype = mtype
            if content_format is not None:
                msg.opt.content_format = content_format
            return await self.context.request(msg).response

        return self.run(go(), timeout)

    def observe(self, uri: str) -> Observer:
        return Observer(self, uri)

    def close(self) -> None:
        try:
            self.run(self.context.shutdown(), 5.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)

    def __enter__(self) -> CoapTestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Observer:
    """An RFC 7641 observation: ``first`` is the registration's response, ``get()`` the next
    notification (a queue filled by the loop thread), ``cancel()`` ends it client-side."""

    def __init__(self, client: CoapTestClient, uri: str) -> None:
        self.client = client
        self.notifications: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()

        async def start() -> None:
            msg = Message(code=aiocoap.GET, uri=uri, observe=0)
            self.request = client.context.request(msg)
            try:
                first = await self.request.response
            except Exception as exc:
                ready.put(exc)
                return
            ready.put(first)
            try:
                async for note in self.request.observation:
                    self.notifications.put(note)
            except Exception as exc:  # the observation ended with an error
                self.notifications.put(exc)
            self.notifications.put(None)  # ended

        self.task = asyncio.run_coroutine_threadsafe(start(), client.loop)
        first = ready.get(timeout=WAIT)
        if isinstance(first, Exception):
            raise first
        self.first: aiocoap.Message = first

    def get(self, timeout: float = WAIT) -> aiocoap.Message | None:
        item = self.notifications.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        def do_cancel() -> None:
            self.request.observation.cancel()

        self.client.loop.call_soon_threadsafe(do_cancel)
