"""One mapping from httpx failures to grid_ipfs's IPFS errors, and one meaning for every `timeout`.

The table and the timeout arithmetic are pure and tested as such; what they do to real calls is
tested against devnet daemons (a stopped node's closed port, a pin nobody can satisfy in time).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os

import httpx
import pytest
from multiformats import CID, multihash

from grid_ipfs import GridError
from grid_ipfs.ipfs import (
    DEFAULT,
    DaemonError,
    DaemonUnreachable,
    IPFSError,
    IPFSTimeout,
    Timeout,
    TooLarge,
    map_transport_errors,
    same_cid,
)
from grid_ipfs.ipfs.errors import TRANSPORT_ERRORS, transport_error_class
from grid_ipfs.ipfs.rpc import DEFAULT_TIMEOUT, KEEPALIVE_EXPIRY, IPFSClient
from grid_ipfs.ipfs.timeouts import resolve

API = "/ip4/127.0.0.1/tcp/5999"
REQUEST = httpx.Request("POST", "http://127.0.0.1:5999/api/v0/cat")

# Written out by hand, not derived from TRANSPORT_ERRORS: this is the contract callers rely on.
EXPECTED = {
    httpx.ConnectTimeout: DaemonUnreachable,
    httpx.ReadTimeout: IPFSTimeout,
    httpx.WriteTimeout: IPFSTimeout,
    httpx.PoolTimeout: IPFSTimeout,
    httpx.TimeoutException: IPFSTimeout,
    httpx.ConnectError: DaemonUnreachable,
    httpx.ReadError: DaemonUnreachable,
    httpx.WriteError: DaemonUnreachable,
    httpx.CloseError: DaemonUnreachable,
    httpx.NetworkError: DaemonUnreachable,
    httpx.RemoteProtocolError: DaemonUnreachable,
    httpx.LocalProtocolError: IPFSError,
    httpx.ProtocolError: DaemonUnreachable,
    httpx.ProxyError: DaemonUnreachable,
    httpx.UnsupportedProtocol: DaemonUnreachable,
    httpx.TransportError: DaemonUnreachable,
    httpx.DecodingError: IPFSError,
    httpx.TooManyRedirects: IPFSError,
    httpx.RequestError: IPFSError,
    httpx.HTTPStatusError: DaemonError,
    httpx.HTTPError: IPFSError,
    httpx.InvalidURL: IPFSError,
}


def _httpx_error(cls: type[Exception]) -> Exception:
    """An instance of `cls` as httpx itself builds one (a message, and the request where it takes one)."""
    if cls is httpx.HTTPStatusError:
        response = httpx.Response(502, request=REQUEST, text="bad gateway")
        return cls("Server error '502 Bad Gateway'\nfor url 'http://127.0.0.1:5999/api/v0/cat'",
                   request=REQUEST, response=response)
    if cls in (httpx.HTTPError, httpx.InvalidURL):
        return cls("multi-line\nreason")
    return cls("multi-line\nreason", request=REQUEST)


def _httpx_error_classes() -> set[type]:
    return {value for value in vars(httpx).values()
            if inspect.isclass(value) and issubclass(value, (httpx.HTTPError, httpx.InvalidURL))}


# -- the table ----------------------------------------------------------------------------------------


def test_the_expected_table_covers_every_httpx_error_class():
    """A class httpx adds (or this table forgets) fails here, so it gets a deliberate mapping."""
    assert _httpx_error_classes() == set(EXPECTED)
    assert set(TRANSPORT_ERRORS) == set(EXPECTED)


@pytest.mark.parametrize("httpx_class, grid_class", EXPECTED.items(), ids=lambda c: c.__name__)
def test_each_httpx_error_raised_in_the_block_becomes_its_one_grid_error(httpx_class, grid_class):
    limits = Timeout(total=None, connect=1.5, read=2.5, write=3.5, pool=4.5)
    with pytest.raises(IPFSError) as caught:
        with map_transport_errors(API, "cat bafyfoo", limits):
            raise _httpx_error(httpx_class)
    error = caught.value
    assert type(error) is grid_class
    assert isinstance(error, GridError)
    message = str(error)
    assert "\n" not in message and "cat bafyfoo" in message
    assert httpx_class.__name__ in message or grid_class is DaemonError
    if grid_class is DaemonUnreachable:
        assert message.startswith(f"IPFS daemon unreachable at {API}: ") and error.api == API
    if grid_class is DaemonError:
        assert error.status == 502 and error.endpoint == "cat bafyfoo"


@pytest.mark.parametrize("httpx_class, seconds", [
    (httpx.ConnectTimeout, "1.5s"), (httpx.ReadTimeout, "2.5s"), (httpx.WriteTimeout, "3.5s"),
    (httpx.PoolTimeout, "4.5s"),
])
def test_a_timeout_message_names_the_limit_that_passed(httpx_class, seconds):
    limits = Timeout(total=None, connect=1.5, read=2.5, write=3.5, pool=4.5)
    with pytest.raises(IPFSError, match=f"within {seconds} \\({httpx_class.__name__}\\)"):
        with map_transport_errors(API, "block bafy", limits):
            raise _httpx_error(httpx_class)


def test_a_subclass_httpx_might_add_lands_on_its_nearest_listed_base():
    class SlowStart(httpx.ReadTimeout):
        pass

    class Reset(httpx.NetworkError):
        pass

    assert transport_error_class(SlowStart) is IPFSTimeout
    assert transport_error_class(Reset) is DaemonUnreachable
    with pytest.raises(KeyError):
        transport_error_class(ValueError)


@pytest.mark.parametrize("raised", [httpx.StreamConsumed(), httpx.ResponseNotRead(), ValueError("bug"),
                                    TooLarge("cat x", 10)], ids=lambda e: type(e).__name__)
def test_bugs_and_grid_errors_pass_through_unchanged(raised):
    with pytest.raises(type(raised)) as caught:
        with map_transport_errors(API, "cat"):
            raise raised
    assert caught.value is raised


# -- one timeout value --------------------------------------------------------------------------------

CLIENT = Timeout(total=None, connect=4.0, read=40.0, write=50.0, pool=6.0)


def test_default_is_the_clients_own_timeout():
    assert resolve(DEFAULT, CLIENT) is CLIENT
    assert repr(DEFAULT) == "DEFAULT" and DEFAULT is not None


def test_none_is_no_limit_at_all():
    limits = resolve(None, CLIENT)
    assert limits == Timeout(total=None, connect=None, read=None, write=None, pool=None)
    assert limits.to_httpx() == httpx.Timeout(None)
    assert limits.daemon_option() is None


def test_seconds_bound_the_whole_call_and_every_phase():
    limits = resolve(2.5, CLIENT)
    assert limits.total == 2.5 and limits.daemon_option() == "2500ms"
    assert limits.to_httpx() == httpx.Timeout(connect=2.5, read=2.5, write=2.5, pool=2.5)


def test_seconds_above_the_clients_read_limit_extend_it_and_keep_the_short_phases():
    limits = resolve(300, CLIENT)
    assert limits.to_httpx() == httpx.Timeout(connect=4.0, read=300.0, write=50.0, pool=6.0)
    assert limits.daemon_option() == "300000ms"


def test_a_timeout_is_taken_as_given_with_total_capping_the_phases():
    given = Timeout(total=1.0, read=9.0)
    assert resolve(given, CLIENT) is given
    assert given.to_httpx() == httpx.Timeout(connect=1.0, read=1.0, write=1.0, pool=1.0)
    assert given.daemon_option() == "1000ms"


def test_an_httpx_timeout_is_taken_as_one_with_no_total():
    limits = resolve(httpx.Timeout(3.0, read=30.0), CLIENT)
    assert limits == Timeout(total=None, connect=3.0, read=30.0, write=3.0, pool=3.0)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), (True, TypeError), ("5", TypeError)])
def test_a_timeout_that_is_no_number_of_seconds_is_refused_in_one_line(bad, error):
    with pytest.raises(error, match="seconds") as caught:
        resolve(bad, CLIENT)
    assert "\n" not in str(caught.value)
    with pytest.raises(error):
        Timeout(read=bad)


def test_a_timeout_is_a_frozen_value():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CLIENT.read = 1.0  # type: ignore[misc]
    assert Timeout(total=2.0) == Timeout(total=2.0) and hash(Timeout(total=2.0)) == hash(Timeout(total=2.0))


@pytest.mark.parametrize("given, expected", [
    (DEFAULT, DEFAULT_TIMEOUT), (None, Timeout.unlimited()), (3.0, DEFAULT_TIMEOUT.limited_to(3.0)),
    (Timeout(total=7.0), Timeout(total=7.0)),
])
def test_the_clients_own_timeout_resolves_the_same_way(given, expected):
    with IPFSClient(API, timeout=given) as client:
        assert client.timeout == expected
        assert resolve(DEFAULT, client.timeout) == expected


def test_every_client_method_with_a_timeout_takes_the_one_type():
    """A method that went back to `float | None` would give `None` its own meaning again."""
    annotated = {}
    for name, method in inspect.getmembers(IPFSClient, inspect.isfunction):
        parameter = inspect.signature(method).parameters.get("timeout")
        if parameter is not None:
            annotated[name] = parameter.annotation
    assert {"cat", "block_get", "dag_get", "pin_add", "pin_update", "dag_export", "dag_import", "repo_gc",
            "wait_ready", "wait_topic_peers", "__init__"} <= set(annotated)
    assert {name for name, annotation in annotated.items() if annotation != "TimeoutTypes"} == set()


# -- against real daemons -----------------------------------------------------------------------------

NOBODY_HAS = CID("base32", 1, "raw", multihash.digest(os.urandom(32), "sha2-256"))


@pytest.mark.integration
def test_a_stopped_daemons_port_is_unreachable_in_one_line(make_devnet):
    net = make_devnet(1)
    node = net.nodes[0]
    net.stop_node(0)
    with node.client() as client:
        with pytest.raises(DaemonUnreachable) as caught:
            client.pin_ls()
    message = str(caught.value)
    assert message.startswith(f"IPFS daemon unreachable at {node.api}: pin/ls: ConnectError")
    assert "\n" not in message and caught.value.api == node.api


@pytest.mark.integration
def test_a_tiny_limit_on_a_call_that_cannot_finish_is_a_timeout(clients):
    """Pinning a CID nobody has never completes; a tenth of a second in all is an IPFSTimeout."""
    with pytest.raises(IPFSTimeout, match="pin/add") as caught:
        clients[0].pin_add(NOBODY_HAS, timeout=0.1)
    assert "\n" not in str(caught.value)
    with pytest.raises(IPFSTimeout, match=str(NOBODY_HAS)[:20]):
        clients[1].block_get(NOBODY_HAS, timeout=Timeout(total=0.1))
    assert not any(same_cid(key, NOBODY_HAS) for key in clients[0].pin_ls(type="recursive"))


@pytest.mark.integration
def test_both_daemons_take_a_whole_call_limit_on_every_endpoint(clients, tmp_path):
    """A limit is sent to the daemon as its `timeout` option; an endpoint refusing it would fail here."""
    client = clients[0]
    cid = client.add(b"limits everywhere", pin=False)
    client.pin_add(cid, timeout=30)
    assert any(same_cid(key, cid) for key in client.pin_ls(cid))
    client.pin_rm(cid, timeout=Timeout(total=30))
    node = client.dag_put({"file": cid, "n": 7})
    client.pin_update(None, node, timeout=30.0)
    assert client.dag_get(f"{node}/n", timeout=30) == 7
    assert client.cat(cid, timeout=None) == b"limits everywhere"
    assert client.cat(cid, timeout=DEFAULT) == b"limits everywhere"
    car = tmp_path / "node.car"
    assert client.dag_export(node, car, timeout=30) == car.stat().st_size > 0
    roots = clients[1].dag_import(car, timeout=30)
    assert len(roots) == 1 and same_cid(roots[0], node)
    assert clients[1].block_get(node, timeout=30) == client.block_get(node, timeout=None)
    assert client.wait_ready(timeout=Timeout(total=10))["ID"]


def test_idle_connections_expire_before_js_ipfs_closes_them():
    """Node's HTTP server (js-ipfs) closes a keep-alive connection idle for 5 s; reusing one at that
    moment loses the request ("Server disconnected without sending a response")."""
    node_keep_alive_timeout = 5.0
    assert KEEPALIVE_EXPIRY < node_keep_alive_timeout / 2
    with IPFSClient("/ip4/127.0.0.1/tcp/1") as client:
        assert client._http._transport._pool._keepalive_expiry == KEEPALIVE_EXPIRY
