"""Transport: everything that speaks to an IPFS daemon. Imports nothing else from grid_ipfs."""

from .cids import CID, cid_str, parse_cid, same_cid
from .errors import (
    DaemonError,
    DaemonUnreachable,
    InvalidCID,
    IPFSError,
    IPFSTimeout,
    NotFound,
    TooLarge,
    map_transport_errors,
)
from .pubsub import PubsubMessage, Subscription
from .rpc import IPFSClient
from .timeouts import DEFAULT, Timeout, TimeoutTypes

__all__ = [
    "IPFSClient", "Subscription", "PubsubMessage",
    "CID", "cid_str", "parse_cid", "same_cid",
    "IPFSError", "DaemonUnreachable", "IPFSTimeout", "NotFound", "TooLarge", "DaemonError", "InvalidCID",
    "map_transport_errors", "Timeout", "TimeoutTypes", "DEFAULT",
]
