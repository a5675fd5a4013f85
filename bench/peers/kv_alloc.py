"""Peer of ``allocate``: the host pool a serving scheduler keeps (reference/kv_alloc.py), stepping in Python.

Its set-up (a host copy of the device pool's state, the sequence ids as a Python list) is done once in
prepare; its reset puts the host pool back before each call, outside the timing; so the timed call is only
the Python bookkeeping a scheduler does for a decode step, timed on the host clock (``host_only``). Its
check holds slots, ok and the pool's state against the expected run, field by field.
"""

import reference.kv_alloc
from bench.peers import Peer, PeerUnavailable, Prepared

# Past this many sequences one host step takes over a second: too slow to time a few dozen rounds of.
HOST_POOL_MAX_SEQS = 1024


def host_copy(pool):
    """The host pool a serving scheduler would keep, in ``pool``'s state (one device-to-host copy, here),
    and a function that puts it back in that state (host tensors only: no device work, no sync)."""
    host = reference.kv_alloc.KVBlockPool(
        pool.num_blocks, pool.block_size, pool.max_seqs, pool.max_blocks_per_seq
    )
    snapshot = {name: getattr(pool, name).cpu() for name in host.STATE}

    def reset():
        for name, value in snapshot.items():
            getattr(host, name).copy_(value)

    reset()
    return host, reset


def host_pool_prepare(inputs, shape) -> Prepared:
    if shape.num_seqs > HOST_POOL_MAX_SEQS:
        raise PeerUnavailable(f"the host pool takes over a second a step past {HOST_POOL_MAX_SEQS} sequences")
    a = inputs.args
    host, reset = host_copy(a["pool"])
    seq_ids = [int(s) for s in a["seq_ids"].tolist()]  # once, here: a scheduler holds its ids on the host
    new_tokens = a["num_new_tokens"]

    def step():  # the host pool rides along in the result (no work): check reads its state
        slots, ok = reference.kv_alloc.allocate(host, seq_ids, new_tokens)
        return slots, ok, host

    return Prepared(step, reset)


def host_pool_check(result, expected, shape) -> float:
    """Same slots, same ok, and the pool's state equal field by field: allocate's own comparison."""
    from bench.cases.base import Inputs
    from bench.cases.kv_alloc import allocate_compare  # here: the case module imports this one

    slots, ok, host = result
    return allocate_compare(Inputs({"pool": host}, ("pool",), result=(slots, ok)), expected, shape)


PEERS = {"host-pool": Peer("host-pool", host_pool_prepare, host_pool_check, host_only=True)}
