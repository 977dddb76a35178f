"""The CA's pod directory against the fake API server, with a clock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.config import NodeAgentsConfig
from meshca.kube.client import api_client
from meshca.kube.podinfo import PodInfo, PodLookupError, parse_pod
from meshca.kube.pods import PodDirectory
from tests.fakes.kube_pods import FakePodsApi, PodTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _web(pod: PodInfo) -> bool:
    return pod.namespace == "shop" and pod.service_account == "web"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[PodTable, FakePodsApi, PodDirectory, Clock]]:
    table = PodTable()
    table.add("shop", "web-1", service_account="web", node="node-a")
    table.add("shop", "db-1", service_account="db", node="node-b")
    (tmp_path / "token").write_text("meshca-pods")
    clock = Clock()
    async with FakePodsApi(table) as api:
        config = NodeAgentsConfig(api_server=api.url, credentials_file=tmp_path / "token")
        directory = PodDirectory(
            api_client(config, "node_agents"),
            ttl=timedelta(seconds=5),
            min_refresh=timedelta(seconds=1),
            timeout=timedelta(seconds=5),
            clock=clock,
        )
        try:
            yield table, api, directory, clock
        finally:
            await directory.close()


async def test_one_request_per_node_for_concurrent_questions(
    setup: tuple[PodTable, FakePodsApi, PodDirectory, Clock],
) -> None:
    _, api, directory, _ = setup
    found = await asyncio.gather(*(directory.find_on_node("node-a", _web) for _ in range(20)))
    assert {pod.name if pod else None for pod in found} == {"web-1"}
    assert api.requests == ["/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a"]


async def test_a_deleted_pod_is_not_found_once_the_ttl_has_passed(
    setup: tuple[PodTable, FakePodsApi, PodDirectory, Clock],
) -> None:
    table, api, directory, clock = setup
    assert await directory.find_on_node("node-a", _web) is not None
    table.delete("shop", "web-1")
    clock.now += 4.9
    assert await directory.find_on_node("node-a", _web) is not None  # within the TTL
    assert len(api.requests) == 1
    clock.now += 0.1
    assert await directory.find_on_node("node-a", _web) is None
    assert len(api.requests) == 2


async def test_a_miss_asks_again_at_most_once_per_min_refresh(
    setup: tuple[PodTable, FakePodsApi, PodDirectory, Clock],
) -> None:
    table, api, directory, clock = setup
    assert await directory.find_on_node("node-b", _web) is None
    assert len(api.requests) == 1  # just asked: a miss does not ask again
    table.add("shop", "web-2", service_account="web", node="node-b")
    for _ in range(5):
        assert await directory.find_on_node("node-b", _web) is None
    assert len(api.requests) == 1
    clock.now += 1
    found = await directory.find_on_node("node-b", _web)
    assert found is not None and found.name == "web-2"
    assert len(api.requests) == 2


async def test_an_expired_answer_is_never_used_when_the_api_fails(
    setup: tuple[PodTable, FakePodsApi, PodDirectory, Clock],
) -> None:
    _, api, directory, clock = setup
    assert await directory.find_on_node("node-a", _web) is not None
    api.down = True
    clock.now += 5
    with pytest.raises(PodLookupError, match="HTTP 503") as info:
        await directory.find_on_node("node-a", _web)
    assert info.value.reason == "pod_lookup_unavailable"


async def test_pods_by_name(setup: tuple[PodTable, FakePodsApi, PodDirectory, Clock]) -> None:
    table, api, directory, clock = setup
    pod = await directory.pod("shop", "web-1")
    assert pod is not None
    assert (pod.uid, pod.node_name, pod.service_account) == (
        table.uid("shop", "web-1"),
        "node-a",
        "web",
    )
    assert await directory.pod("shop", "nope") is None
    api.expected_bearer = "another-token"
    clock.now += 10
    with pytest.raises(PodLookupError, match=r"HTTP 401 \(check meshca's RBAC"):
        await directory.pod("shop", "web-1")


def test_objects_without_what_an_identity_needs_are_not_pods() -> None:
    table = PodTable()
    good = table.add("shop", "web-1", service_account="web")
    assert parse_pod(good) is not None
    for path in (("metadata", "uid"), ("metadata", "namespace"), ("spec", "serviceAccountName")):
        broken = {k: dict(v) if isinstance(v, dict) else v for k, v in good.items()}
        del broken[path[0]][path[1]]
        assert parse_pod(broken) is None, path
    assert parse_pod("not an object") is None
    pending = parse_pod(table.add("shop", "web-2", service_account="web", phase="Pending"))
    unscheduled = parse_pod(table.add("shop", "web-3", service_account="web", node=None))
    done = parse_pod(table.add("shop", "web-4", service_account="web", phase="Succeeded"))
    assert pending is not None and pending.active
    assert unscheduled is not None and not unscheduled.active
    assert done is not None and not done.active
