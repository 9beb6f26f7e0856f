"""Request body cap for every route, whether the client sends Content-Length or streams chunks."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.errors import PayloadTooLargeError


class BodyTooLarge(StarletteHTTPException):
    """Raised inside ``receive`` when a streamed body passes the cap.

    An HTTP exception, because FastAPI re-raises those from its body parsing (any other exception
    there becomes a 400); the app's handler (:mod:`api.errors`) answers it with the 413 error shape.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than {max_bytes} bytes")
        self.error = too_large(max_bytes)


def too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body is larger than {max_bytes} bytes", detail={"max_request_bytes": max_bytes})


class BodySizeLimitMiddleware:
    """Answer 413 (the one JSON error shape) for bodies above ``max_bytes``.

    A declared Content-Length above the cap is refused before anything is read. A chunked body is
    counted as it streams; once it passes the cap the app's read fails and, provided the app has
    not started its response, the client gets the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _send_413(self, send: Send) -> None:
        error = too_large(self.max_bytes)
        body = json.dumps(error.to_dict()).encode()
        await send({"type": "http.response.start", "status": error.http_status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._send_413(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._send_413(send)
