#!/bin/sh
# grid_ipfs: make a Kubo node a member of a private federated-learning swarm.
#
# The ipfs/kubo image runs every *.sh in /container-init.d/ on EVERY container start: after
# `ipfs init` (first start only: that is also when the image copies IPFS_SWARM_KEY(_FILE) into the
# repo) and before `ipfs daemon`, as the unprivileged `ipfs` user. So this script is idempotent and
# re-applies the whole configuration each time; nothing here needs the daemon to be running.
#
# Environment (set in docker-compose.yml or workers/worker.env):
#   IPFS_SWARM_KEY_FILE  file holding the swarm key (or IPFS_SWARM_KEY, the key itself). Required.
#   LIBP2P_FORCE_PNET=1  makes libp2p refuse to start without a swarm key. Required.
#   GRID_SEED_API        RPC multiaddr of the seed node (node 0) on the container network, e.g.
#                        /dns4/ipfs0/tcp/5001. Node 0's peer id is asked from there at start,
#                        because it only exists once node 0 has created its repo.
#   GRID_SEED_SWARM      the seed's swarm multiaddr without /p2p, e.g. /dns4/ipfs0/tcp/4001.
#   GRID_PEERS           more peers, space separated, each a full multiaddr ending in /p2p/<peer id>
#                        (nodes on other machines: /dns4/host.example.org/tcp/4001/p2p/12D3Koo...).
#   GRID_ALLOW_SAMPLE_SWARM_KEY=1  accept the publicly known sample key (never in production).
set -eu

log() { printf 'grid-init: %s\n' "$*"; }
die() { printf 'grid-init: ERROR: %s\n' "$*" >&2; exit 1; }

IPFS_PATH="${IPFS_PATH:-/data/ipfs}"
KEY="$IPFS_PATH/swarm.key"
# The hex of the sample key in workers/swarm.key.SAMPLE ("grid_ipfs SAMPLE key, NOT SECRET").
SAMPLE_KEY_HEX=677269645f697066732053414d504c45206b65792c204e4f5420534543524554

# -- 1. private network: the swarm key ------------------------------------------------------------
# The image installs the key only when it creates the repo. Installing it again on every start makes
# a rotated key (a new file behind IPFS_SWARM_KEY_FILE) take effect on the next restart.
install_key() {  # $1: the key's content
    if [ ! -f "$KEY" ] || [ "$(cat "$KEY")" != "$1" ]; then
        rm -f "$KEY"
        (umask 077 && printf '%s\n' "$1" > "$KEY")
        chmod 0400 "$KEY"
        log "installed the swarm key"
    fi
}
if [ -n "${IPFS_SWARM_KEY_FILE:-}" ]; then
    [ -r "$IPFS_SWARM_KEY_FILE" ] || die "cannot read IPFS_SWARM_KEY_FILE=$IPFS_SWARM_KEY_FILE (it must be readable by uid $(id -u))"
    install_key "$(cat "$IPFS_SWARM_KEY_FILE")"
elif [ -n "${IPFS_SWARM_KEY:-}" ]; then
    install_key "$IPFS_SWARM_KEY"
fi
[ -s "$KEY" ] || die "no swarm key in $KEY: set IPFS_SWARM_KEY_FILE (docs/deployment.md says how to make one)"
head -n 1 "$KEY" | grep -q '^/key/swarm/psk/1.0.0/$' || die "$KEY is not a swarm key (first line must be /key/swarm/psk/1.0.0/)"
if grep -qi "$SAMPLE_KEY_HEX" "$KEY" && [ "${GRID_ALLOW_SAMPLE_SWARM_KEY:-0}" != 1 ]; then
    die "this is the PUBLIC SAMPLE swarm key from workers/swarm.key.SAMPLE: anyone can join a swarm that uses it. Generate your own (docs/deployment.md)"
fi
[ "${LIBP2P_FORCE_PNET:-}" = 1 ] || log "WARNING: LIBP2P_FORCE_PNET is not 1; set it so the node never starts without the key"

# -- 2. no public network: no bootstrap list, no AutoConf, no delegated routing -------------------
# AutoConf (Kubo >= 0.37) fetches public defaults and fills the "auto" placeholders below; it does
# not belong in a private swarm, and Kubo refuses "auto" routing on a private network.
ipfs config --json AutoConf.Enabled false
ipfs bootstrap rm --all > /dev/null
ipfs config --json DNS.Resolvers '{}'
ipfs config --json Routing.DelegatedRouters '[]'
ipfs config --json Ipns.DelegatedPublishers '[]'
# dhtserver, not dht: with no public reachability checks in a private swarm, "dht" would leave every
# node a DHT client and the WAN DHT empty. A small private DHT lets peers find each other (and topic
# peers for pubsub) through the seed.
ipfs config Routing.Type dhtserver
ipfs config --json Discovery.MDNS.Enabled false
ipfs config --json AutoTLS.Enabled false
ipfs config AutoNAT.ServiceMode disabled
ipfs config --json Swarm.DisableNatPortMap true
ipfs config --json Swarm.RelayClient.Enabled false
ipfs config --json Swarm.RelayService.Enabled false
ipfs config --json Swarm.EnableHolePunching false

# -- 3. pubsub: jobs, rounds and updates travel on pubsub topics ---------------------------------
# (the daemon flag --enable-pubsub-experiment is deprecated since Kubo 0.40; the config key is not)
ipfs config --json Pubsub.Enabled true
ipfs config Pubsub.Router gossipsub

# -- 4. listeners ---------------------------------------------------------------------------------
# Swarm: TCP only (private networks need a transport the pre-shared key can wrap; QUIC, WebTransport
# and WebRTC cannot be used with one). RPC API: every interface of the CONTAINER, so the workers on
# the compose network reach it; docker-compose.yml never publishes it beyond 127.0.0.1.
# Gateway: container loopback only (nothing here needs it).
ipfs config --json Addresses.Swarm '["/ip4/0.0.0.0/tcp/4001"]'
ipfs config --json Swarm.Transports.Network.QUIC false
ipfs config --json Swarm.Transports.Network.WebTransport false
ipfs config --json Swarm.Transports.Network.WebRTCDirect false
ipfs config --json Swarm.Transports.Network.Websocket false
ipfs config Addresses.API /ip4/0.0.0.0/tcp/5001
ipfs config Addresses.Gateway /ip4/127.0.0.1/tcp/8080

# -- 5. peering -----------------------------------------------------------------------------------
# Peering.Peers keeps a connection to each listed peer and redials it when it drops; the same
# addresses go to Bootstrap so the DHT starts from them and nodes find each other through the seed.
peers="${GRID_PEERS:-}"
keep_previous=0
if [ -n "${GRID_SEED_API:-}" ]; then
    [ -n "${GRID_SEED_SWARM:-}" ] || die "GRID_SEED_API is set but GRID_SEED_SWARM is not"
    seed_id="$(ipfs --api="$GRID_SEED_API" --timeout=20s id -f='<id>' 2> /dev/null || true)"
    if [ -n "$seed_id" ]; then
        peers="$peers $GRID_SEED_SWARM/p2p/$seed_id"
    elif [ "$(ipfs config Peering.Peers 2> /dev/null || echo null)" != null ]; then
        log "WARNING: the seed's RPC API $GRID_SEED_API does not answer; keeping the previous Peering.Peers"
        keep_previous=1
    else
        die "the seed's RPC API $GRID_SEED_API does not answer, so its peer id is unknown (is the seed node up?)"
    fi
fi
if [ "$keep_previous" = 0 ]; then
    json=""
    for addr in $peers; do
        case "$addr" in
            */p2p/*) ;;
            *) die "peer address $addr has no /p2p/<peer id>" ;;
        esac
        id="${addr##*/p2p/}"
        json="$json${json:+,}{\"ID\":\"$id\",\"Addrs\":[\"${addr%/p2p/*}\"]}"
        ipfs bootstrap add "$addr" > /dev/null
    done
    ipfs config --json Peering.Peers "[$json]"
fi

log "node $(ipfs config Identity.PeerID): private swarm, pubsub on, peering with: ${peers:-nobody (this is the seed)}"
