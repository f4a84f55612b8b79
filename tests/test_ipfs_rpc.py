"""The RPC client against real daemons: every call, across two nodes, plus the failure modes."""

from __future__ import annotations

import os
import time

import dag_cbor
import pytest
from multiformats import CID, multihash

from grid_ipfs.ipfs import DaemonError, DaemonUnreachable, InvalidCID, IPFSTimeout, TooLarge, same_cid
from grid_ipfs.ipfs.rpc import IPFSClient, api_url

pytestmark = pytest.mark.integration

# A CID nobody on the devnet has: the sha2-256 of random bytes never added anywhere.
NOBODY_HAS = CID("base32", 1, "raw", multihash.digest(os.urandom(32), "sha2-256"))


def test_id_and_version(clients):
    info = clients[0].id()
    assert info["ID"] and clients[0].version()["Version"]
    assert clients[0].flavour in ("kubo", "js-ipfs")


def test_add_on_one_node_cat_on_another(clients):
    data = os.urandom(300_000)
    cid = clients[0].add(data)
    assert clients[1].cat(cid, timeout=30) == data
    assert clients[2].cat(str(cid), timeout=30) == data


def test_cat_size_limit_stops_early(clients):
    cid = clients[0].add(b"x" * 5000)
    with pytest.raises(TooLarge, match="5000|limit of 1000"):
        clients[1].cat(cid, max_size=1000)


def test_cat_of_missing_cid_returns_within_its_timeout(clients):
    start = time.monotonic()
    with pytest.raises(IPFSTimeout, match=str(NOBODY_HAS)[:20]):
        clients[1].cat(NOBODY_HAS, timeout=2)
    assert time.monotonic() - start < 10


def test_bad_cid_names_itself(clients):
    with pytest.raises(InvalidCID, match="not-a-cid"):
        clients[0].cat("not-a-cid")


def test_pins(clients):
    cid = clients[0].add(b"pin me", pin=False)
    clients[0].pin_add(cid)
    assert any(same_cid(key, cid) for key in clients[0].pin_ls(cid))
    clients[0].pin_rm(cid)
    assert not any(same_cid(key, cid) for key in clients[0].pin_ls(type="recursive"))


def test_block_put_get_and_dag_put_across_nodes(clients):
    child = clients[0].add(b"leaf")
    node = {"name": "grid", "link": child, "n": 3}
    data = dag_cbor.encode(node)
    local = CID("base32", 1, "dag-cbor", multihash.digest(data, "sha2-256"))
    put = clients[0].block_put(data, codec="dag-cbor")
    assert same_cid(put, local) and put.codec.name == "dag-cbor"
    assert clients[1].block_get(local) == data
    assert dag_cbor.decode(clients[2].block_get(put))["link"] == child
    assert same_cid(clients[0].dag_put(node), local)


def test_dag_get_walks_a_path_to_a_scalar(clients):
    first = clients[0].dag_put({"round": 1})
    second = clients[0].dag_put({"round": 2, "prev": first})
    assert clients[1].dag_get(f"{second}/prev/round") == 1


def test_swarm_peers(devnet, clients):
    assert {n.peer_id for n in devnet.nodes[1:]} <= set(clients[0].swarm_peers())


@pytest.mark.parametrize("size", [1, 1024, 900 * 1024])
def test_pubsub_binary_payloads_cross_nodes(clients, size):
    topic = f"test/bin/{size}"
    payload = os.urandom(size)
    with clients[1].pubsub_subscribe(topic) as sub:
        sub.wait_ready()
        clients[0].wait_topic_peers(topic, 1)
        assert clients[0].pubsub_publish(topic, payload) is True
        msg = sub.get(timeout=20)
    assert msg is not None, "message not delivered"
    assert msg.data == payload and msg.topic == topic
    assert msg.sender == clients[0].id()["ID"] and msg.seqno


def test_pubsub_empty_payload(clients):
    """Kubo delivers a 0-byte message; js-ipfs 0.66 refuses it at the API (documented quirk)."""
    topic = "test/bin/empty"
    with clients[1].pubsub_subscribe(topic) as sub:
        sub.wait_ready()
        clients[0].wait_topic_peers(topic, 1)
        if clients[0].flavour == "js-ipfs":
            with pytest.raises(DaemonError, match='"data" is required'):
                clients[0].pubsub_publish(topic, b"")
            return
        assert clients[0].pubsub_publish(topic, b"")
        msg = sub.get(timeout=20)
    assert msg is not None and msg.data == b""


def test_pubsub_unicode_topic_ls_and_peers(clients):
    topic = "grid-ipfs/tëst/ジョブ/🚀"
    with clients[2].pubsub_subscribe(topic) as sub:
        sub.wait_ready()
        assert topic in clients[2].pubsub_ls()
        peers = clients[0].wait_topic_peers(topic, 1)
        assert clients[2].id()["ID"] in peers
        assert clients[0].pubsub_publish(topic, "héllo".encode())
        msg = sub.get(timeout=20)
    assert msg is not None and msg.data.decode() == "héllo" and msg.topic == topic


def test_publish_with_no_subscriber_is_not_an_error(clients):
    assert clients[0].pubsub_publish("test/nobody-listens", b"x") in (True, False)


def test_subscription_resumes_after_its_daemon_restarts(make_devnet):
    net = make_devnet(2)
    publisher, listener = net.nodes[0].client(), net.nodes[1].client()
    topic = "test/resume"
    with listener.pubsub_subscribe(topic, backoff=(0.1, 1.0)) as sub:
        sub.wait_ready()
        net.stop_node(1)
        from tests.waiting import wait_for

        wait_for(lambda: not sub.ready, 20, what="the subscription to notice its daemon went away")
        net.start_node(1)
        sub.wait_ready(60)
        assert sub.reconnects >= 1
        publisher.wait_topic_peers(topic, 1, timeout=30)
        assert publisher.pubsub_publish(topic, b"after restart")
        msg = sub.get(timeout=20)
    assert msg is not None and msg.data == b"after restart"


def test_unreachable_daemon_is_a_typed_error():
    with IPFSClient("/ip4/127.0.0.1/tcp/9", timeout=2) as client:
        with pytest.raises(DaemonUnreachable, match="127.0.0.1/tcp/9"):
            client.id()


def test_api_url_forms():
    assert api_url("/ip4/127.0.0.1/tcp/5001") == "http://127.0.0.1:5001"
    assert api_url("/ip4/127.0.0.1/tcp/5001/http") == "http://127.0.0.1:5001"
    assert api_url("/dns4/kubo0/tcp/5001") == "http://kubo0:5001"
    assert api_url("/ip6/::1/tcp/5001") == "http://[::1]:5001"
    assert api_url("http://host:1/") == "http://host:1"
    with pytest.raises(ValueError, match="expected e.g."):
        api_url("localhost:5001")
