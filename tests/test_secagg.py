"""Pairwise-mask secure aggregation: masks cancel exactly in the sum and hide every single update."""

from __future__ import annotations

import numpy as np
import pytest

from grid_ipfs.aggregate import fedavg
from grid_ipfs.identity import Identity
from grid_ipfs.secagg import MaskKey, mask_context, mask_update, masked_like, secure_fedavg
from grid_ipfs.strategies import aggregate

IDS = sorted(Identity.generate().id for _ in range(4))


def _round(seed: int = 0):
    rng = np.random.default_rng(seed)
    updates = [([rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)],
                int(rng.integers(10, 200))) for _ in IDS]
    keys = {worker: MaskKey() for worker in IDS}
    peers = {worker: key.public for worker, key in keys.items()}
    return updates, keys, peers


FIRST_TRY = mask_context("job", 1, 1)


def _masked(updates, keys, peers, context=FIRST_TRY):
    return [(mask_update(w, n, keys[worker], worker, peers, context), n)
            for worker, (w, n) in zip(IDS, updates)]


def test_the_masks_cancel_and_the_sum_is_fedavg():
    updates, keys, peers = _round()
    masked = _masked(updates, keys, peers)
    secure = secure_fedavg(masked)
    plain = fedavg(updates)
    for s, p in zip(secure, plain):
        assert s.dtype == np.float32 and s.shape == p.shape
        np.testing.assert_allclose(s, p, atol=1e-6)
    # registered as a rule: verify recomputes it by name, bit for bit
    again = aggregate("secure-fedavg", masked)
    assert all(np.array_equal(a, b) for a, b in zip(again, secure))


def test_a_masked_update_hides_the_update():
    updates, keys, peers = _round()
    masked = _masked(updates, keys, peers)
    weights, n = updates[0]
    plain_fixed = np.rint(weights[0].astype(np.float64) * n * 2 ** 24).astype(np.int64).view(np.uint64)
    assert masked[0][0][0].dtype == np.uint64
    assert np.mean(masked[0][0][0] == plain_fixed) < 0.01  # nothing of it shows through
    # the masked values look uniform over 64 bits: about half have the top bit set
    top = np.concatenate([(w >> np.uint64(63)).ravel() for w, _ in masked for w in w]).mean()
    assert 0.3 < top < 0.7


def test_a_missing_worker_or_another_context_leaves_noise_not_the_average():
    updates, keys, peers = _round()
    masked = _masked(updates, keys, peers)
    plain = fedavg(updates[:3])
    partial = secure_fedavg(masked[:3])
    assert np.abs(partial[0] - plain[0]).max() > 1e3
    # the same worker in another attempt of the round draws other masks: nothing cancels across attempts
    other = _masked(updates, keys, peers, mask_context("job", 1, 2))
    mixed = secure_fedavg(masked[:2] + other[2:])
    assert np.abs(mixed[0] - fedavg(updates)[0]).max() > 1e3


def test_shapes_dtypes_and_keys_are_checked():
    updates, keys, peers = _round()
    masked = _masked(updates, keys, peers)
    with pytest.raises(ValueError, match="uint64 tensors"):
        secure_fedavg([masked[0], (updates[1][0], updates[1][1])])
    with pytest.raises(ValueError, match="at least one"):
        secure_fedavg([])
    with pytest.raises(ValueError, match="not an X25519 public key"):
        mask_update(updates[0][0], 1, keys[IDS[0]], IDS[0], {IDS[1]: "AAAA"}, b"c")
    with pytest.raises(ValueError, match="too large"):
        mask_update([np.full(2, 1e30, np.float32)], 1, keys[IDS[0]], IDS[0], peers, b"c")
    assert [m.shape for m in masked_like(updates[0][0])] == [(5, 3), (3,)]


def test_dp_over_secure_aggregation_clips_adds_the_noise_shares_and_sums_exactly():
    from grid_ipfs.secagg import dp_share

    rng = np.random.default_rng(7)
    reference = [np.zeros((200, 50), np.float32)]
    updates = [[rng.normal(scale=s, size=(200, 50)).astype(np.float32)] for s in (0.001, 0.001, 10.0, 0.001)]
    keys = {worker: MaskKey() for worker in IDS}
    peers = {worker: key.public for worker, key in keys.items()}

    def run(z):
        shares = [dp_share(u, reference, clip=1.0, noise_multiplier=z, workers=len(IDS), rng=np.random.default_rng(i))
                  for i, u in enumerate(updates)]
        masked = [(mask_update(s, 1, keys[w], w, peers, FIRST_TRY), 500) for w, s in zip(IDS, shares)]
        return aggregate("secure-dp-fedavg", masked, reference=reference, clip=1.0, noise_multiplier=z), shares

    quiet, shares = run(0.0)
    assert np.linalg.norm(shares[2][0]) == pytest.approx(1.0)  # the big update was clipped to C
    np.testing.assert_allclose(quiet[0], np.mean([s[0] for s in shares], axis=0), atol=1e-6)  # equal weights
    noisy, _ = run(2.0)
    # the four shares add up to N(0, (z C)^2); the mean over 4 workers has std z C / 4 = 0.5
    assert np.std(noisy[0] - quiet[0]) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="clip"):
        aggregate("secure-dp-fedavg", [(masked_like(reference), 1)], reference=reference, clip=0.0,
                  noise_multiplier=1.0)


def test_workers_read_the_secure_dp_settings_from_the_job_config():
    from grid_ipfs.worker import secure_dp

    assert secure_dp({"secure_aggregation": True}) is None
    assert secure_dp({"secure_aggregation": True, "dp_clip": 3, "dp_noise": 0.5}) == (3.0, 0.5)
    for bad in ({"dp_clip": 3, "dp_noise": 0.5},  # worker-side noise only with secure aggregation
                {"secure_aggregation": True, "dp_clip": 0, "dp_noise": 0.5},
                {"secure_aggregation": True, "dp_clip": 1, "dp_noise": float("nan")},
                {"secure_aggregation": True, "dp_clip": 1}):
        with pytest.raises(ValueError, match="dp_"):
            secure_dp(bad)


def test_a_mask_key_is_signed_by_its_worker_for_one_job():
    from grid_ipfs.secagg import mask_key_is_signed, sign_mask_key, unsigned_mask_keys

    alice, bob, owner = Identity.generate(), Identity.generate(), Identity.generate()
    keys = {alice.id: MaskKey().public, bob.id: MaskKey().public}
    sigs = {alice.id: sign_mask_key(alice, "job", keys[alice.id]), bob.id: sign_mask_key(bob, "job", keys[bob.id])}
    assert mask_key_is_signed("job", alice.id, keys[alice.id], sigs[alice.id])
    assert unsigned_mask_keys("job", keys, sigs) == []
    # the owner swaps in a key of its own for bob: bob's signature does not cover it, nor can the owner sign
    swapped = {**keys, bob.id: MaskKey().public}
    assert unsigned_mask_keys("job", swapped, sigs) == [bob.id]
    forged = {**sigs, bob.id: sign_mask_key(owner, "job", swapped[bob.id])}
    assert unsigned_mask_keys("job", swapped, forged) == [bob.id]
    # a signature is bound to its job and its worker; missing or garbage ones are just "unsigned"
    assert unsigned_mask_keys("other-job", keys, sigs) == sorted(keys)
    assert not mask_key_is_signed("job", bob.id, keys[alice.id], sigs[alice.id])
    assert unsigned_mask_keys("job", keys, {alice.id: sigs[alice.id]}) == [bob.id]
    assert unsigned_mask_keys("job", keys, {alice.id: "!!", bob.id: None}) == sorted(keys)
