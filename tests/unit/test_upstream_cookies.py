"""The shared upstream client never carries one tenant's upstream cookies to another request."""

from __future__ import annotations

import httpx

from proxy.config import UpstreamConfig
from proxy.upstream import Upstream


async def test_set_cookie_is_not_replayed():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "__cf_bm=tenant-a-session; Path=/"}, json={})

    up = Upstream.build("u", UpstreamConfig(base_url="http://upstream.test/v1"))
    up.client._transport = httpx.MockTransport(handler)
    await up.client.get("http://upstream.test/v1/models")
    await up.client.get("http://upstream.test/v1/models")
    assert seen == [None, None]
    await up.aclose()
