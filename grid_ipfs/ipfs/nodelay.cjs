// Loaded into js-ipfs daemons by grid_ipfs.ipfs.devnet (NODE_OPTIONS=--require): turn Nagle's algorithm
// off on every TCP socket, as Go does by default for Kubo's.
//
// With Nagle on, each small libp2p frame (multistream-select, mplex headers, a bitswap want) waits for
// the peer's delayed ACK (40 ms on Linux), so one remote block costs ~0.27 s however small it is:
// measured on the devnet, a 1 KB block_get from a connected node took 0.275 s with Node's default and
// 0.025 s with this; a 5 MB cat 0.76 s and 0.18 s.
'use strict'
const net = require('net')

const connect = net.Socket.prototype.connect
net.Socket.prototype.connect = function (...args) {
  this.setNoDelay(true) // kept until the handle exists, then applied (Node >= 18)
  return connect.apply(this, args)
}

const emit = net.Server.prototype.emit
net.Server.prototype.emit = function (event, socket, ...rest) {
  if (event === 'connection' && socket != null && typeof socket.setNoDelay === 'function') {
    socket.setNoDelay(true)
  }
  return emit.call(this, event, socket, ...rest)
}
