"""`python -m grid_ipfs.devnet up|down|status`: loopback IPFS daemons for development and tests.

    python -m grid_ipfs.devnet up --nodes 3 --dir .devnet     # start, connect, print the APIs
    python -m grid_ipfs.devnet status --dir .devnet
    python -m grid_ipfs.devnet down --dir .devnet             # stop exactly what `up` started

Exit codes: 0 ok, 1 the devnet could not be started/stopped (one-line reason on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .ipfs.devnet import Devnet, DevnetError
from .ipfs.errors import IPFSError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.devnet", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N connected loopback daemons")
    up.add_argument("--nodes", type=int, default=3, help="how many daemons (default 3)")
    up.add_argument("--dir", required=True, help="directory for the repos and devnet.json")
    up.add_argument("--json", action="store_true", help="print the devnet as JSON")
    up.add_argument("--daemon", choices=["kubo", "js-ipfs"], help="force an implementation (default: Kubo if on PATH)")
    for name, text in (("down", "stop the daemons started under --dir"), ("status", "say which nodes answer")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", required=True)
        p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    try:
        if args.command == "up":
            from .ipfs.devnet import Daemon

            net = Devnet.up(args.nodes, args.dir, daemon=Daemon.find(args.daemon))
            if args.json:
                print(json.dumps(net.as_dict()))
            else:
                print(f"{len(net.nodes)} {net.daemon.kind} node(s) up; state in {net.directory}/devnet.json")
                for node in net.nodes:
                    print(f"  node{node.index}  api {node.api}  peer {node.peer_id}  pid {node.pid}")
        elif args.command == "down":
            stopped = Devnet.down(args.dir)
            print(json.dumps({"stopped": stopped}) if args.json else f"stopped {len(stopped)} daemon(s)")
        else:
            rows = Devnet.load(args.dir).status()
            if args.json:
                print(json.dumps(rows))
            for row in rows if not args.json else []:
                state = f"up, {row['peers']} peers" if row["up"] else f"DOWN ({row['error']})"
                print(f"  node{row['node']}  {row['api']}  pid {row['pid']}  {state}")
            return 0 if all(row["up"] for row in rows) else 1
    except (DevnetError, IPFSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        Devnet.down(args.dir)
        print("interrupted; stopped what was started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
