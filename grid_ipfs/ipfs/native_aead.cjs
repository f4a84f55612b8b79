// Loaded into js-ipfs daemons by grid_ipfs.ipfs.devnet (NODE_OPTIONS=--require): libp2p-noise's
// ChaCha20-Poly1305 runs in OpenSSL (node:crypto) instead of @stablelib's pure JavaScript, as Kubo's
// runs in Go's assembly. Same cipher (RFC 8439), same bytes on the wire.
//
// Every byte a js-ipfs node sends or receives goes through this cipher. Measured here: stablelib seals
// ~100 MB/s, OpenSSL ~640 MB/s, and it was the largest share of the daemons' CPU in a round.
//
// Only 12-byte nonces (all Noise uses) take the native path; anything else, or a Node without the
// cipher, keeps stablelib's code. `open` writes into `dst` only after the tag verified, as stablelib does.
'use strict'
const crypto = require('crypto')
const fs = require('fs')
const path = require('path')

const CIPHER = 'chacha20-poly1305'
const KEY_LENGTH = 32
const NONCE_LENGTH = 12
const TAG_LENGTH = 16

function stablelibClass () {
  // Resolve from the daemon's own install (argv[1] is node_modules/.bin/jsipfs or the script it points
  // to), then from here, so the class patched is the one libp2p-noise imports.
  const places = [__dirname]
  if (process.argv[1]) {
    try { places.unshift(path.dirname(fs.realpathSync(process.argv[1]))) } catch {}
  }
  try {
    return require(require.resolve('@stablelib/chacha20poly1305', { paths: places })).ChaCha20Poly1305
  } catch {
    return null // not a js-ipfs install: nothing to speed up
  }
}

function seal (original) {
  return function (nonce, plaintext, associatedData, dst) {
    if (nonce.length !== NONCE_LENGTH || this._key.length !== KEY_LENGTH) {
      return original.call(this, nonce, plaintext, associatedData, dst)
    }
    const resultLength = plaintext.length + TAG_LENGTH
    if (dst && dst.length !== resultLength) {
      throw new Error('ChaCha20Poly1305: incorrect destination length')
    }
    const cipher = crypto.createCipheriv(CIPHER, this._key, nonce, { authTagLength: TAG_LENGTH })
    if (associatedData && associatedData.length > 0) {
      cipher.setAAD(associatedData, { plaintextLength: plaintext.length })
    }
    const body = cipher.update(plaintext)
    cipher.final()
    const result = dst || new Uint8Array(resultLength)
    result.set(body, 0)
    result.set(cipher.getAuthTag(), plaintext.length)
    return result
  }
}

function open (original) {
  return function (nonce, sealed, associatedData, dst) {
    if (nonce.length !== NONCE_LENGTH || this._key.length !== KEY_LENGTH) {
      return original.call(this, nonce, sealed, associatedData, dst)
    }
    if (sealed.length < TAG_LENGTH) {
      return null
    }
    const length = sealed.length - TAG_LENGTH
    const decipher = crypto.createDecipheriv(CIPHER, this._key, nonce, { authTagLength: TAG_LENGTH })
    decipher.setAuthTag(sealed.subarray(length))
    if (associatedData && associatedData.length > 0) {
      decipher.setAAD(associatedData, { plaintextLength: length })
    }
    const body = decipher.update(sealed.subarray(0, length))
    try {
      decipher.final()
    } catch {
      return null // the tag did not verify: stablelib returns null and leaves dst alone
    }
    if (dst) {
      if (dst.length !== length) {
        throw new Error('ChaCha20Poly1305: incorrect destination length')
      }
      dst.set(body)
      return dst
    }
    return new Uint8Array(body.buffer, body.byteOffset, body.length)
  }
}

// One message sealed and opened both ways before anything is patched: a Node whose OpenSSL lists the cipher
// but refuses it (a FIPS build) keeps stablelib's code instead of failing every connection.
function agrees (ChaCha20Poly1305, nativeSeal, nativeOpen) {
  try {
    const aead = new ChaCha20Poly1305(crypto.randomBytes(KEY_LENGTH))
    const nonce = crypto.randomBytes(NONCE_LENGTH)
    const plain = new Uint8Array(crypto.randomBytes(100))
    const ad = new Uint8Array(crypto.randomBytes(32))
    const sealed = nativeSeal.call(aead, nonce, plain, ad)
    const reference = ChaCha20Poly1305.prototype.seal.call(aead, nonce, plain, ad)
    const opened = nativeOpen.call(aead, nonce, reference, ad)
    return Buffer.compare(Buffer.from(sealed), Buffer.from(reference)) === 0 && opened !== null &&
      Buffer.compare(Buffer.from(opened), Buffer.from(plain)) === 0
  } catch {
    return false
  }
}

const ChaCha20Poly1305 = stablelibClass()
const nativeSeal = ChaCha20Poly1305 && seal(ChaCha20Poly1305.prototype.seal)
const nativeOpen = ChaCha20Poly1305 && open(ChaCha20Poly1305.prototype.open)
if (ChaCha20Poly1305 && !ChaCha20Poly1305.prototype.seal.native && crypto.getCiphers().includes(CIPHER) &&
    agrees(ChaCha20Poly1305, nativeSeal, nativeOpen)) {
  nativeSeal.native = nativeOpen.native = true
  ChaCha20Poly1305.prototype.seal = nativeSeal
  ChaCha20Poly1305.prototype.open = nativeOpen
}
