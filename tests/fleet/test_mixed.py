"""A mixed fleet: the bundled GGUF in process beside a proxy, each with its own slots, one queue in front."""

from __future__ import annotations

import httpx
import openai

from testkit.upstream import FakeUpstream
from tests.fleet.conftest import StartFleet, member


def test_a_local_model_and_a_proxy_serve_side_by_side(start_fleet: StartFleet, upstreams: list[FakeUpstream]) -> None:
    remote = upstreams[0]
    gw = start_fleet(
        [
            {"name": "small", "type": "local", "max_concurrent": 2, "n_ctx": 512, "models": ["smollm", "shared"]},
            member("remote", remote, 2, models=["remote-model", "shared"]),
        ],
        routing="round_robin",
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    local = client.chat.completions.create(
        model="smollm", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
    )
    assert local.choices[0].message.content and local.model == "smollm"
    proxied = client.chat.completions.create(model="remote-model", messages=[{"role": "user", "content": "x"}])
    assert proxied.choices[0].message.content == "echo: x"
    # One pool served by both kinds: each prepares the request its own way (the local model tokenizes it).
    answers = [
        client.chat.completions.create(model="shared", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4)
        for i in range(6)
    ]
    echoed = sum(1 for a in answers if (a.choices[0].message.content or "").startswith("echo:"))
    assert 0 < echoed < 6
    listed = {m.id: m.owned_by for m in client.models.list()}
    assert listed == {"smollm": "local", "shared": "local", "remote-model": "proxy"}
    backends = {b["name"]: b for b in httpx.get(gw.url + "/v1/queue/status").json()["backends"]}
    assert backends["small"]["type"] == "local" and backends["small"]["base_url"] is None
    assert backends["small"]["max_concurrent"] == 2 and backends["remote"]["max_concurrent"] == 2
    assert len(httpx.get(gw.url + "/v1/queue/status").json()["workers"]) == 4
