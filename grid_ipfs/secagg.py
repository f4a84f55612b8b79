"""Pairwise-mask secure aggregation for FedAvg (Bonawitz et al., CCS 2017, without dropout recovery).

The owner learns the example-weighted sum of the round's updates and nothing about any single one:

- Each worker holds a fresh X25519 key per job and announces its public half in its `join`, with its
  Ed25519 signature over (job, worker id, key) (`sign_mask_key`). The round message lists the
  selected workers' public keys (`mask_keys`) and those signatures (`mask_sigs`); a worker masks only
  when every listed key is signed by the worker it is listed for (`unsigned_mask_keys`), so an owner
  cannot swap in keys of its own to unmask someone.
- Worker i turns its update into fixed point, `q_i = round(n_i * w_i * 2**SCALE_BITS)` in uint64
  (wrapping arithmetic, two's complement for negatives), and adds, for every other selected worker j,
  `+PRG(s_ij)` if i < j else `-PRG(s_ij)`, where `s_ij` is their X25519 shared secret run through
  HKDF with the job, round and attempt. The masked update is uniformly random to anyone without the
  secrets; it is what goes to IPFS and into the chain.
- Summing every selected worker's masked update mod 2**64 cancels the masks exactly: integer sums,
  so the owner and every auditor get the same bits (`secure_fedavg`, recorded as `secure-fedavg`).

What it does not do: survive dropouts (a missing worker leaves its masks in the sum, so the round is
announced again with fresh masks among the workers still answering; Bonawitz et al. recover with
secret-shared keys, not implemented), screen outliers or run robust rules (they need to see single
updates), or stop an owner that selects one honest worker among workers it runs itself (sybils): the
sum minus the sybils' updates is the honest one. An allow-list of workers (`--allow-workers`) is the
defence there. It protects updates from everybody who reads IPFS or the chain and from an owner that
swaps keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .aggregate import SCALE_BITS, secure_fedavg
from .identity import Identity, b64url_decode, b64url_encode, verify

__all__ = ["SCALE_BITS", "MaskKey", "mask_context", "mask_update", "dp_share", "secure_fedavg", "masked_like",
           "sign_mask_key", "mask_key_is_signed", "unsigned_mask_keys"]

class MaskKey:
    """A worker's X25519 key for one job: `public` (base64url) goes into its `join`."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self._private = private or X25519PrivateKey.generate()
        self.public = b64url_encode(self._private.public_key().public_bytes_raw())

    def shared_seed(self, peer_public: str, context: bytes) -> bytes:
        """32 bytes both ends derive alike: HKDF-SHA256 over the X25519 secret, bound to `context`."""
        try:
            peer = X25519PublicKey.from_public_bytes(b64url_decode(peer_public))
        except ValueError as exc:
            raise ValueError(f"mask key {peer_public[:16]!r}: not an X25519 public key ({exc})") from None
        secret = self._private.exchange(peer)
        return HKDF(hashes.SHA256(), 32, salt=None, info=b"grid-ipfs secagg v1|" + context).derive(secret)


def _mask_key_statement(job: str, worker: str, mask_key: str) -> bytes:
    return f"grid-ipfs secagg v1 mask key|{job}|{worker}|{mask_key}".encode()


def sign_mask_key(identity: Identity, job: str, mask_key: str) -> str:
    """The worker's signature (base64url) binding its public mask key to itself and to the job."""
    return b64url_encode(identity.sign(_mask_key_statement(job, identity.id, mask_key)))


def mask_key_is_signed(job: str, worker: str, mask_key: str, sig: str | None) -> bool:
    """Whether `sig` is `worker`'s signature of `mask_key` for `job`; False on any malformed input."""
    try:
        raw = b64url_decode(sig) if isinstance(sig, str) else b""
    except ValueError:
        return False
    return verify(worker, _mask_key_statement(job, worker, mask_key), raw)


def unsigned_mask_keys(job: str, mask_keys: Mapping[str, str], mask_sigs: Mapping[str, str] | None) -> list[str]:
    """The workers in `mask_keys` whose key is not signed by that worker for `job` (sorted; [] if all are)."""
    sigs = mask_sigs or {}
    return sorted(w for w, key in mask_keys.items() if not mask_key_is_signed(job, w, key, sigs.get(w)))


def mask_context(job: str, round: int, attempt: int) -> bytes:
    """Masks are fresh per job, round and attempt: a re-announced round never reuses one."""
    return f"{job}|{round}|{attempt}".encode()


def mask_update(weights: Sequence[np.ndarray], num_examples: int, key: MaskKey, me: str,
                peers: Mapping[str, str], context: bytes) -> list[np.ndarray]:
    """Worker `me`'s masked fixed-point update; `peers` maps every selected worker id (`me` included or
    not) to its public mask key."""
    out = [_fixed_point(w, num_examples) for w in weights]
    total = sum(int(w.size) for w in out)
    for peer in sorted(peers):
        if peer == me:
            continue
        stream = _prg(key.shared_seed(peers[peer], context), total)
        sign = np.uint64(1 if me < peer else 2**64 - 1)  # +mask or -mask, mod 2**64
        offset = 0
        for i, w in enumerate(out):
            with np.errstate(over="ignore"):
                out[i] = w + sign * stream[offset:offset + w.size].reshape(w.shape)
            offset += w.size
    return out


def dp_share(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray], *, clip: float,
             noise_multiplier: float, workers: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """A worker's part of DP-FedAvg over secure aggregation (`aggregate.secure_dp_fedavg`): its delta from
    `reference` scaled to L2 norm at most `clip`, plus Gaussian noise of variance (z C)^2 / `workers`,
    so that the round's `workers` shares sum to noise N(0, (z C)^2). The noise comes from the operating
    system's entropy (`rng` for tests): nobody can subtract it, unlike a seed recorded in the chain."""
    deltas = [np.asarray(w, np.float64) - np.asarray(r, np.float64) for w, r in zip(weights, reference)]
    norm = math.sqrt(math.fsum(float(np.square(d).sum()) for d in deltas))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    rng = rng or np.random.default_rng()
    sigma = noise_multiplier * clip / math.sqrt(workers)
    return [d * factor + rng.standard_normal(d.shape) * sigma for d in deltas]


def masked_like(like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What a masked update looks like for `payloads.weights_from_bytes(like=...)`: uint64, same shapes."""
    return [np.zeros(np.shape(w), np.uint64) for w in like]


def _fixed_point(weights: np.ndarray, num_examples: int) -> np.ndarray:
    scaled = np.rint(np.asarray(weights, np.float64) * num_examples * 2.0 ** SCALE_BITS)
    if not np.isfinite(scaled).all() or np.abs(scaled).max(initial=0) >= 2.0 ** 62:
        raise ValueError("update too large for secure aggregation's fixed point")
    return scaled.astype(np.int64).view(np.uint64)


def _prg(seed: bytes, count: int) -> np.ndarray:
    """`count` uint64 from ChaCha20 keyed by `seed` (a fresh key per pair and round, so a zero nonce)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * count)), dtype="<u8").astype(np.uint64)
