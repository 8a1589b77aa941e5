"""Settings for a NATS cluster: a URL list, the replica count, and the local stack's cluster shape."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from core.settings import Settings
from events.client import connect_options
from events.streams import CONSUMERS, STREAMS, stream_config
from handlers.bridge.receipts import bucket_config

CLUSTER = "nats://n0.example.org:4222, nats://n1.example.org:4222,nats://n2.example.org:4222"


def test_a_comma_separated_url_is_every_server_a_client_connects_to(tmp_path: Path) -> None:
    s = Settings(_env_file=None, home=tmp_path, nats_url=CLUSTER, nats_replicas=3)
    assert s.nats_servers == [f"nats://n{i}.example.org:4222" for i in range(3)]
    assert connect_options(s)["servers"] == s.nats_servers
    assert not s.nats_is_local_stack and s.nats_replicas == 3
    assert Settings(_env_file=None, home=tmp_path).nats_replicas == 1  # one server: R1


def test_the_local_cluster_stack_sets_urls_and_replicas_unless_settings_do(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"nats_cluster": 3}))
    (tmp_path / "nats-users.json").write_text(json.dumps({"client": "generated"}))
    s = Settings(_env_file=None, home=tmp_path, stack_nats_port=5000)
    assert s.stack_nats_cluster == 3 and s.nats_replicas == 3
    assert s.nats_servers == ["nats://127.0.0.1:5000", "nats://127.0.0.1:5001", "nats://127.0.0.1:5002"]
    assert s.nats_is_local_stack and s.nats_password_for("client") is not None
    # explicit settings win; one node of the stack is still the stack (its passwords, its replicas)
    one = Settings(_env_file=None, home=tmp_path, stack_nats_port=5000, nats_url="nats://127.0.0.1:5001")
    assert one.nats_servers == ["nats://127.0.0.1:5001"] and one.nats_replicas == 3 and one.nats_is_local_stack
    assert Settings(_env_file=None, home=tmp_path, stack_nats_port=5000, nats_replicas=1).nats_replicas == 1
    # a list that names another server is not the stack: its passwords are never offered there
    mixed = Settings(_env_file=None, home=tmp_path, stack_nats_port=5000,
                     nats_url="nats://127.0.0.1:5000,nats://nats.example.org:4222")
    assert not mixed.nats_is_local_stack and mixed.nats_password_for("client") is None and mixed.nats_replicas == 1


def test_streams_consumers_and_the_receipts_bucket_carry_the_replicas() -> None:
    assert {stream_config(c, 3).num_replicas for c in STREAMS} == {3}
    assert {c.config(replicas=3).num_replicas for c in CONSUMERS} == {3}
    assert {c.config().num_replicas for c in CONSUMERS} == {1}
    assert bucket_config(replicas=3).num_replicas == 3 and bucket_config().num_replicas == 1


def test_each_local_node_routes_to_the_others_with_a_password(tmp_path: Path) -> None:
    from infra.stack import LocalStack

    s = Settings(_env_file=None, home=tmp_path, stack_nats_cluster=3, stack_nats_port=5000,
                 stack_nats_monitor_port=6000, stack_nats_route_port=7000)
    st = LocalStack(s, only=("nats",))
    assert [svc.name for svc in st.services] == ["nats-1", "nats-2", "nats-3"]
    st.install()
    secret = json.loads((tmp_path / "nats-route.json").read_text())["password"]
    for i in range(3):
        conf = tmp_path / f"nats-{i + 1}.conf"
        text = conf.read_text()
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert f'"server_name": "codetune-n{i + 1}"' not in text and f'server_name: "codetune-n{i + 1}"' in text
        assert f'"listen": "127.0.0.1:{7000 + i}"' in text and f"port: {5000 + i}" in text
        routes = {f"nats-route://route:{secret}@127.0.0.1:{7000 + j}" for j in range(3) if j != i}
        assert all(r in text for r in routes) and f"@127.0.0.1:{7000 + i}" not in text
        assert "authorization" in text and "nats-cluster/n" in text
    assert stat.S_IMODE((tmp_path / "nats-route.json").stat().st_mode) == 0o600


async def test_provisioning_waits_out_a_cluster_electing_leaders_but_not_a_single_server() -> None:
    import pytest
    from nats.errors import TimeoutError as NatsTimeout

    from events.client import _through_elections

    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise NatsTimeout

    await _through_elections(step, clustered=True)
    assert calls == 3
    calls = 0
    with pytest.raises(NatsTimeout):
        await _through_elections(step, clustered=False)
    assert calls == 1
