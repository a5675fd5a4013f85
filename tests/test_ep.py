"""kernels/ep.py against reference/ep.py: on real gloo groups of 2 and 4 spawned processes (127.0.0.1, a
free port, a group timeout), and in this process on a group of one, where workspaces, host syncs and bad
input are cheap to check. Spawned runs are few (each costs seconds of imports on CI's two cores)."""

import dataclasses
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

import kernels.ep as ep
import kernels.moe as moe
from bench.format import us
from bench.measure import collectives
from bench.measure.distributed import spawn
from bench.operators import ep as ep_case
from bench.serving.models import MoEModel
from bench.testing import assert_bitwise_equal, assert_close, forbid_allocation, generator, randn, seed_of
from reference import ep as reference
from tests import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: A small MoE layer for time_ep's tests: 4 experts, top 2, rows of 16.
_TINY = MoEModel(name="tiny", hidden=16, num_experts=4, top_k=2, intermediate=8)


def _passed_results(outcomes, world):
    """Every rank exited cleanly and reported; each rank's result."""
    assert len(outcomes) == world
    for outcome in outcomes:
        assert outcome.error is None and outcome.exitcode == 0, f"rank {outcome.rank}: {outcome.error}"
    return [outcome.result for outcome in outcomes]


def _passed(outcomes, world):
    """Every rank exited cleanly and reported; their lines, all ranks together."""
    return [line for result in _passed_results(outcomes, world) for line in result]


def test_two_ranks_match_the_reference_and_reject_bad_input_everywhere(capsys):
    """What ``decodebench run`` shows on a CPU: 2 gloo ranks, every scenario in both modes against the
    reference, each bad input raising on both ranks, the all-reduce summing."""
    from bench.commands.run import _across_ranks

    assert _across_ranks()
    out = capsys.readouterr().out
    passed = [line for line in out.splitlines() if line.startswith("rank ") and "checks passed" in line]
    assert len(passed) == 2 and passed[0].split(":")[1] == passed[1].split(":")[1], out
    for scenario in ep_case.SCENARIOS:
        for mode in ep.MODES:
            assert f"rank 0 {scenario.name} {mode}: " in out
            assert f"rank 0 {scenario.name} {mode} dedup: " in out
    for name in ("num_experts", "x", "ids", "weights", "max_tokens_per_rank", "dedup", "workspace.send"):
        assert f"rank 0 bad {name}: ValueError" in out
    assert out.count("all-reduce gloo") == 2


def test_four_ranks_with_uneven_tokens_match_the_reference():
    # 5, 17, 0 and 9 tokens: a rank with none, the others different (reruns: the 2-rank test's business);
    # with and without dedup, each checked for send_rows (the distinct (token, rank) pairs with dedup).
    lines = _passed(spawn(collectives.ep_check, 4, args=(ep_case.SCENARIOS[:1], 7, False)), 4)
    assert sum("uneven exact:" in line for line in lines) == 4
    assert sum("uneven capacity dedup:" in line for line in lines) == 4


def test_a_dead_rank_is_named_by_the_survivor_and_nothing_hangs():
    # With dedup: both paths meet the dead rank in the same first collective (the counts exchange).
    outcomes = spawn(collectives.dispatch_with_a_dead_rank, 2, args=(1, True), timeout_s=10, deadline_s=60)
    survivor, victim = outcomes
    assert victim.exitcode not in (0, None) and victim.error  # killed, reported by the launcher
    assert survivor.exitcode == 1, survivor
    assert "PeerFailure" in survivor.error and "rank 1 stopped responding" in survivor.error, survivor.error


def dispatch_over_the_bound(rank):
    """Rank 1 holds more tokens than capacity mode's bound: only it raises; rank 0 is left in a collective."""
    tokens = 3 if rank.rank == 1 else 2
    x, weights = torch.randn(tokens, 8), torch.full((tokens, 2), 0.5)
    ids = torch.tensor([[0, 3]] * tokens, dtype=torch.int32)
    with collectives.guard(rank, "ep_dispatch"):
        recv_x, handle = ep.ep_dispatch(x, weights, ids, 4, mode="capacity", max_tokens_per_rank=2)
        ep.ep_combine(recv_x, handle)


def test_a_rank_over_the_capacity_bound_alone_raises_and_its_peer_ends_with_a_peer_failure():
    """Passes on the old code too: it pins what ep_dispatch's docstring now says."""
    survivor, over = spawn(dispatch_over_the_bound, 2, timeout_s=5, deadline_s=60)
    assert over.exitcode == 1 and over.error.startswith("ValueError: x: 3 tokens"), over
    assert survivor.exitcode == 1, survivor
    assert "PeerFailure" in survivor.error and "rank 1 stopped responding" in survivor.error, survivor.error


def one_rank_fails_while_its_peer_waits_unwatched(rank):
    """Rank 1 fails; rank 0 stands for a peer no process-group timeout watches (left in NCCL's set-up, or in
    a graph-replayed collective): it sleeps far past any timeout."""
    if rank.rank == 1:
        raise RuntimeError("rank 1 failed")
    time.sleep(600)


def test_a_failed_rank_ends_the_run_for_a_peer_no_timeout_watches():
    """The launcher stops the ranks left a timeout (and 10 s) after one fails, not at the deadline."""
    start = time.monotonic()
    waiting, failed = spawn(one_rank_fails_while_its_peer_waits_unwatched, 2, timeout_s=1, deadline_s=600)
    assert time.monotonic() - start < 60
    assert failed.exitcode == 1 and "rank 1 failed" in failed.error, failed
    assert waiting.exitcode is None, waiting  # killed by the launcher


def graph_capture_refused_on_rank_1(rank):
    """_graph_replay_ms with capture refused on rank 1 only (a GPU-free stand-in for capture_graph)."""

    def capture(fn):
        if rank.rank == 1:
            raise RuntimeError("capture refused")
        return lambda: None

    collectives.capture_graph = capture  # this rank's process only
    shape = ep_case.EPShape(_TINY, world=2, tokens=2, mode="capacity")
    return collectives._graph_replay_ms(rank, shape, None, None, {}, None, reps=1)[:2]


def test_a_graph_refused_on_one_rank_is_timed_on_none():
    """The ranks agree before replaying: rank 0 (captured) does not go on to replay and wait in collectives
    its peer never joins; each rank says why."""
    mine = _passed_results(spawn(graph_capture_refused_on_rank_1, 2, timeout_s=5, deadline_s=60), 2)
    assert mine[0] == (None, "not captured: rank(s) 1 could not capture")
    assert mine[1] == (None, "not captured on rank 1: RuntimeError: capture refused")


# --- one rank, in this process ------------------------------------------------------------------------------


@pytest.fixture
def group():
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    yield
    dist.destroy_process_group()


def _inputs(tokens, experts, top_k, hidden, seed, dtype=torch.float32, load="zipf"):
    gen = generator(seed)
    ids = ep_case.routing_ids(tokens, experts, top_k, load, gen)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=1)
    x = randn((tokens, hidden), dtype, "cpu", gen)
    return x, weights, ids


@pytest.mark.cpu_kernels  # a gloo group in this process: CPU tensors
@pytest.mark.parametrize("mode", ep.MODES)
@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("dedup", [False, True])
def test_one_rank_matches_the_reference(group, mode, align, dedup, request):
    x, weights, ids = _inputs(11, 6, 3, 20, seed_of(request.node.name))
    ((want_x, want),) = reference.ep_dispatch([x], [weights], [ids], 6, align=align, dedup=dedup)
    extra = {"max_tokens_per_rank": 16} if mode == "capacity" else {}
    recv_x, handle = ep.ep_dispatch(x, weights, ids, 6, align=align, mode=mode, dedup=dedup, **extra)
    assert_bitwise_equal(handle.expert_offsets, want.expert_offsets, "offsets")
    assert handle.send_rows.tolist() == want.send_rows == [11 if dedup else 33]
    for e, count in enumerate(want.tokens_per_expert.tolist()):
        start = want.expert_offsets[e]
        assert_bitwise_equal(recv_x[start : start + count], want_x[start : start + count], f"expert {e}")
    offsets = handle.expert_offsets.tolist()
    y = ep_case.expert_outputs(recv_x, offsets, 0)
    out = ep.ep_combine(y, handle)
    (expected,) = reference.ep_combine([ep_case.expert_outputs(want_x, offsets, 0)], [want], [weights])
    assert_close(out, expected, "out", dtype=x.dtype)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dedup", [False, True])
def test_capacity_mode_with_a_workspace_allocates_nothing_and_reads_nothing_on_the_host(
    group, monkeypatch, dedup
):
    x, weights, ids = _inputs(9, 8, 2, 24, 5, dtype=torch.bfloat16)
    capacity = {"mode": "capacity", "max_tokens_per_rank": 12, "dedup": dedup}
    want_x, want_handle = ep.ep_dispatch(x, weights, ids, 8, align=4, **capacity)
    want = ep.ep_combine(want_x, want_handle)
    workspace = ep.EPWorkspace.for_shape(
        9, 2, 8, 24, world_size=1, max_tokens_per_rank=12, align=4, dtype=torch.bfloat16, dedup=dedup
    )

    def no_host_read(*args, **kwargs):
        raise AssertionError("capacity mode read a device value on the host")

    forbid_allocation(monkeypatch, ep, moe)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    recv_x, handle = ep.ep_dispatch(x, weights, ids, 8, align=4, workspace=workspace, **capacity)
    out = ep.ep_combine(recv_x, handle)
    monkeypatch.undo()
    assert recv_x is workspace.recv_x and out is workspace.out
    assert_bitwise_equal(handle.expert_offsets, want_handle.expert_offsets, "offsets")
    assert_bitwise_equal(out, want, "out")


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("with_workspace", [False, True])
def test_capacity_mode_holds_ids_repeated_within_a_token(group, with_workspace):
    """Issue 20, item 3: 2 experts, top-3, so a token repeats an id and sends 3 rows to a rank holding 2
    experts. The slabs were sized for min(k, E/W) rows a token: the rows past them were dropped and combine
    read rows never written (up to 1e28 off). Now capacity mode matches exact mode and the reference."""
    gen = generator(11)
    ids = torch.randint(2, (7, 3), generator=gen, dtype=torch.int32)
    ids[:5] = torch.tensor([0, 0, 0], dtype=torch.int32)  # more rows to expert 0 than 7 x min(3, 2)
    weights = torch.softmax(torch.randn(7, 3, generator=gen), dim=1)
    x = randn((7, 12), torch.float32, "cpu", gen)
    ((want_x, want),) = reference.ep_dispatch([x], [weights], [ids], 2, align=4)
    offsets = want.expert_offsets.tolist()
    (expected,) = reference.ep_combine([ep_case.expert_outputs(want_x, offsets, 0)], [want], [weights])
    workspace = (
        ep.EPWorkspace.for_shape(7, 3, 2, 12, world_size=1, max_tokens_per_rank=8, align=4, dtype=x.dtype)
        if with_workspace
        else None
    )
    recv_x, handle = ep.ep_dispatch(
        x, weights, ids, 2, align=4, mode="capacity", max_tokens_per_rank=8, workspace=workspace
    )
    assert_bitwise_equal(handle.expert_offsets, want.expert_offsets, "offsets")
    assert recv_x.shape[0] >= offsets[-1]
    for e, count in enumerate(want.tokens_per_expert.tolist()):
        start = offsets[e]
        assert_bitwise_equal(recv_x[start : start + count], want_x[start : start + count], f"expert {e}")
    out = ep.ep_combine(ep_case.expert_outputs(recv_x, offsets, 0), handle)
    assert_close(out, expected, "out", dtype=x.dtype)
    exact_x, exact = ep.ep_dispatch(x, weights, ids, 2, align=4)
    assert_bitwise_equal(out, ep.ep_combine(ep_case.expert_outputs(exact_x, offsets, 0), exact), "exact")


@pytest.mark.cpu_kernels
def test_bad_input_names_the_argument(group):
    x, weights, ids = _inputs(4, 4, 2, 8, 3)
    recv_x, handle = ep.ep_dispatch(x, weights, ids, 4)
    bad = {
        "align": lambda: ep.ep_dispatch(x, weights, ids, 4, align=0),
        "mode": lambda: ep.ep_dispatch(x, weights, ids, 4, mode="dropping"),
        "x": lambda: ep.ep_dispatch(x, weights, ids, 4, mode="capacity", max_tokens_per_rank=3),
        "max_tokens_per_rank": lambda: ep.ep_dispatch(x, weights, ids, 4, max_tokens_per_rank=8),
        "workspace": lambda: ep.ep_dispatch(
            x, weights, ids, 4, mode="capacity", max_tokens_per_rank=8, workspace=1
        ),
        "workspace.recv_x": lambda: ep.ep_dispatch(
            x,
            weights,
            ids,
            4,
            mode="capacity",
            max_tokens_per_rank=8,
            workspace=ep.EPWorkspace.for_shape(
                4, 2, 4, 8, world_size=1, max_tokens_per_rank=8, align=2, dtype=x.dtype
            ),
        ),
        "handle": lambda: ep.ep_combine(recv_x, object()),
        "y": lambda: ep.ep_combine(recv_x[1:], handle),
        # Issue 20, item 5: these failed later with AttributeError and TypeError.
        "group": lambda: ep.ep_dispatch(x, weights, ids, 4, group="world"),
        "stage_hook": lambda: ep.ep_dispatch(x, weights, ids, 4, stage_hook=5),
        "workspace.dispatch": lambda: ep.ep_dispatch(
            x, weights, ids, 4, mode="capacity", max_tokens_per_rank=8, workspace=_workspace(dispatch=None)
        ),
        "dedup": lambda: ep.ep_dispatch(x, weights, ids, 4, dedup=1),
        # A workspace for the other kind of call: dedup's slabs hold a row per (token, rank), not per pair.
        "workspace.send": lambda: ep.ep_dispatch(
            x, weights, ids, 4, mode="capacity", max_tokens_per_rank=8, dedup=True, workspace=_workspace()
        ),
    }
    for name, call in bad.items():
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()
    with pytest.raises(ValueError, match="^y:"):
        ep.ep_combine(recv_x.double(), handle)


def _workspace(**replaced):
    """A capacity-mode workspace for _inputs(4, 4, 2, 8, ...) with max_tokens_per_rank 8, some buffers
    replaced (each a value, or f(workspace))."""
    workspace = ep.EPWorkspace.for_shape(4, 2, 4, 8, world_size=1, max_tokens_per_rank=8, dtype=torch.float32)
    fields = {name: value(workspace) if callable(value) else value for name, value in replaced.items()}
    return dataclasses.replace(workspace, **fields)


def test_stage_bytes_by_hand():
    # Qwen3-235B on 2 ranks, 3 tokens: this rank (0) sends 10 rows to rank 1, receives 7 from it.
    shape = ep_case.EPShape(ep_case.MOE_MODELS["Qwen3-235B-A22B"], 2, 3)
    row = 4096 * 2
    got = ep_case.stage_bytes(shape, 0, sent=[14, 10], received=[14, 7], distinct=3)
    assert got["rows"]["bytes"] == 10 * row and got["return"]["bytes"] == 7 * row
    assert got["rows"]["dedup"] == 3 * row
    assert got["layout"]["bytes"] == 2 * 21 * row
    assert got["pack"]["bytes"] == 3 * row + 24 * row + 24 * 12
    padded = ep_case.stage_bytes(ep_case.EPShape(shape.model, 2, 3, mode="capacity"), 0, [14, 10], [14, 7], 3)
    assert padded["rows"]["bytes"] == 3 * 8 * row and padded["rows"]["useful"] == 10 * row
    # Deduplicated: 3 rows kept, 2 sent to rank 1 (each with its 8 pairs' meta: 64 bytes), 4 received from
    # it, the 7 rows received expanding to 21 pairs; capacity mode's slabs hold 3 rows.
    meta = 2 * 8 * 4
    dedup = ep_case.EPShape(shape.model, 2, 3, mode="exact-dedup")
    got = ep_case.stage_bytes(dedup, 0, sent=[3, 2], received=[3, 4], distinct=2, received_pairs=21)
    assert (
        got["rows"]["bytes"] == got["rows"]["useful"] == 2 * (row + meta) and got["rows"]["dedup"] == 2 * row
    )
    assert got["return"]["bytes"] == 4 * row
    assert (
        got["layout"]["bytes"] == (7 + 21) * row + 7 * meta and got["combine"]["bytes"] == (5 + 3) * row + 24
    )
    padded = ep_case.stage_bytes(dataclasses.replace(dedup, mode="capacity-dedup"), 0, [3, 2], [3, 4], 2, 21)
    assert padded["rows"]["bytes"] == 3 * (row + meta) and padded["return"]["bytes"] == 3 * row


@pytest.mark.cpu_kernels  # CPU tensors built by hand around the kernel
@pytest.mark.parametrize("slab", [0, 40])
def test_dedup_pack_sends_each_token_once_per_rank(monkeypatch, slab):
    """_dedup_pack_kernel against a model, with 3 ranks' experts (no group needed): a row per (token, rank)
    in token order per rank (slab 0: packed, exact mode; else capacity mode's slabs), each pair's place
    where the exchange without dedup sends it (by expert, then (token, choice)), the counts with the rows
    last, token_rows; nothing else written. 37 tokens in 3 programs, each scanning the ids 8 tokens a step;
    a token naming one expert twice, and an id out of range (dropped, as moe.dispatch drops it)."""
    monkeypatch.setattr(ep, "_SCAN_TOKENS", 8)
    world, local, top_k, hidden, tokens = 3, 2, 3, 5, 37
    gen = generator(slab + 3)
    ids = torch.randint(world * local, (tokens, top_k), generator=gen, dtype=torch.int32)
    ids[3] = torch.tensor([4, 4, 1], dtype=torch.int32)
    ids[5, 2] = 99
    weights = torch.rand(tokens, top_k, generator=gen)
    x = randn((tokens, hidden), torch.float32, "cpu", gen)
    rows = world * slab if slab else tokens * min(top_k, world)
    send = torch.full((rows, hidden), float("nan"))
    meta = torch.full((rows, 2 * top_k), -7, dtype=torch.int32)
    counts = torch.full((world, local + 1), -7, dtype=torch.int32)
    token_rows = torch.full((tokens, world), -7, dtype=torch.int32)
    ep._dedup_pack(
        x,
        ids,
        weights,
        world * local,
        world,
        send=send,
        meta=meta,
        send_counts=counts,
        token_rows=token_rows,
        slab=slab,
    )

    choices = [
        (t, c, e) for t, row in enumerate(ids.tolist()) for c, e in enumerate(row) if e < world * local
    ]
    order = {r: sorted((e, t, c) for t, c, e in choices if e // local == r) for r in range(world)}
    place = {(t, c): order[e // local].index((e, t, c)) for t, c, e in choices}
    touched = [sorted({t for t, _, e in choices if e // local == r}) for r in range(world)]
    starts = [r * slab for r in range(world)] if slab else [sum(map(len, touched[:r])) for r in range(world)]
    want_counts = [
        [len([1 for *_, e in choices if e == r * local + i]) for i in range(local)] for r in range(world)
    ]
    assert counts.tolist() == [c + [len(t)] for c, t in zip(want_counts, touched)]
    want_rows = [[-1] * world for _ in range(tokens)]
    written = torch.zeros(rows, dtype=torch.bool)
    bits = weights.view(torch.int32).tolist()
    for r in range(world):
        for i, t in enumerate(touched[r]):
            row = want_rows[t][r] = starts[r] + i
            mine = [(t, c) in place and ids[t, c] // local == r for c in range(top_k)]
            want_meta = [place[t, c] if m else -1 for c, m in enumerate(mine)]
            want_meta += [bits[t][c] if m else 0 for c, m in enumerate(mine)]
            assert meta[row].tolist() == want_meta, (t, r)
            assert torch.equal(send[row], x[t])
            written[row] = True
    assert token_rows.tolist() == want_rows
    assert send[~written].isnan().all() and (meta[~written] == -7).all(), "a row no (token, rank) owns"


def test_dist_without_torchrun_says_how_to_run_it(monkeypatch, capsys):
    from bench.commands import cli

    monkeypatch.delenv("RANK", raising=False)  # not a torchrun rank
    assert cli.main(["dist", "ep"]) == 2
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.cpu_kernels
def test_buffers_sharing_memory_are_refused_before_anything_is_written(group):
    """Issue 20, item 4: workspace buffers over each other or over an input, and a y over a buffer
    ep_combine writes, raise ValueError naming both, on the host, before any stage runs."""
    x, weights, ids = _inputs(4, 4, 2, 8, 3)
    capacity = {"mode": "capacity", "max_tokens_per_rank": 8}
    over_x = _workspace()
    bad = {
        "workspace.send": (_workspace(recv=lambda w: w.send), x, "workspace.recv"),
        "workspace.out": (
            _workspace(out=lambda w: w.dispatch.x_sorted[:4]),
            x,
            "workspace.dispatch.x_sorted",
        ),
        "workspace.recv_x": (over_x, over_x.recv_x[:4], "x"),
    }
    stages = []
    for name, (workspace, rows, other) in bad.items():
        with pytest.raises(ValueError, match=f"^{name}: .*{other}"):
            ep.ep_dispatch(
                rows, weights, ids, 4, workspace=workspace, stage_hook=lambda s: stages.append(s), **capacity
            )
    assert not stages, stages
    workspace = _workspace()
    recv_x, handle = ep.ep_dispatch(x, weights, ids, 4, workspace=workspace, **capacity)
    with pytest.raises(ValueError, match="^y: .*workspace.recv"):
        ep.ep_combine(workspace.recv, handle)
    ep.ep_combine(recv_x, handle)  # experts that wrote their outputs over recv_x: allowed
    dedup = ep.EPWorkspace.for_shape(
        4, 2, 4, 8, world_size=1, max_tokens_per_rank=8, dtype=x.dtype, dedup=True
    )
    with pytest.raises(ValueError, match="^workspace.send_meta: .*workspace.recv_meta"):
        ep.ep_dispatch(
            x,
            weights,
            ids,
            4,
            dedup=True,
            workspace=dataclasses.replace(dedup, recv_meta=dedup.send_meta),
            stage_hook=lambda s: stages.append(s),
            **capacity,
        )
    assert not stages, stages


def test_dist_starts_its_ranks_itself_with_either_backend(monkeypatch):
    """`dist --nproc` on one host spawns its ranks (their store on a 127.0.0.1 listener: the loopback test
    below) for NCCL too; torchrun's stores listen on every interface whatever address they are given."""
    from bench.commands import cli
    from bench.commands import dist as dist_command

    seen = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist_command, "_has_cuda", lambda: True)
    monkeypatch.setattr(dist_command, "_cuda_devices", lambda: 8)
    monkeypatch.setattr(
        dist_command.distributed, "spawn", lambda fn, world, **kw: seen.append((world, kw["backend"])) or []
    )
    assert cli.main(["dist", "--nproc", "2", "allreduce"]) == 0
    assert cli.main(["dist", "--nproc", "3", "allreduce", "--backend", "gloo"]) == 0
    assert seen == [(2, "nccl"), (3, "gloo")]


def test_spawned_ranks_name_loopback_whatever_the_environment_says(monkeypatch):
    from bench.measure import distributed

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    distributed.loopback_only()
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"


def test_nccl_ranks_bind_their_gpu_as_the_group_starts(monkeypatch):
    """init_process_group without device_id warns under NCCL and leaves the communicator's device to guess."""
    from bench.measure import distributed

    seen = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setenv("LOCAL_RANK", "0")
    rank = distributed._start(0, 1, "nccl", dist.HashStore(), 5.0)
    rank.liveness.stop()
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 0)


# --- the regroup kernel alone: any counts matrix, one process ---------------------------------------------


def _segments(counts, packed_slab, align):
    """Where each segment (a, b) starts in the packed buffer and, grouped by column, in recv_x."""
    num_a, num_b = len(counts), len(counts[0])
    packed, start = {}, 0
    for a in range(num_a):
        start = a * packed_slab if packed_slab else start
        for b in range(num_b):
            packed[a, b] = start
            start += counts[a][b]
    grouped, start = {}, 0
    for b in range(num_b):
        column = start
        for a in range(num_a):
            grouped[a, b] = start
            start += counts[a][b]
        start = column + -(-(start - column) // align) * align
    return packed, grouped, start


@helpers.property_test(
    lambda st: dict(
        counts=st.integers(1, 4).flatmap(
            lambda b: st.lists(st.lists(st.integers(0, 5), min_size=b, max_size=b), min_size=1, max_size=4)
        ),
        align=st.sampled_from([1, 2, 3, 8]),
        slab_extra=st.sampled_from([None, 0, 3]),  # None: packed (exact mode); else slabs (capacity mode)
        hidden=st.sampled_from([1, 5, 33]),
    ),
    max_examples=20,  # `pytest --fuzz` runs the long search
)
def test_regroup_property(counts, align, slab_extra, hidden):
    """Packed -> grouped by column and back, for any counts matrix, align and slab: every row lands where
    reference/ep.py's layout puts it, the counts and offsets are the column sums, nothing else is written."""
    num_a, num_b = len(counts), len(counts[0])
    slab = 0 if slab_extra is None else max(map(sum, counts)) + slab_extra
    packed_at, grouped_at, grouped_rows = _segments(counts, slab, align)
    packed_rows = num_a * slab if slab else sum(map(sum, counts))
    packed = torch.arange(max(packed_rows, 1) * hidden, dtype=torch.float32).view(-1, hidden)
    grouped = torch.full((grouped_rows + 2, hidden), float("nan"))
    tokens, offsets = (
        torch.full((num_b,), -7, dtype=torch.int32),
        torch.full((num_b + 1,), -7, dtype=torch.int32),
    )
    matrix = torch.tensor(counts, dtype=torch.int32)
    layout = dict(packed_rows=packed_rows, packed_slab=slab, align=align, by_column=True)
    ep._regroup(packed, grouped, matrix, **layout, tokens_per_expert=tokens, expert_offsets=offsets)
    assert tokens.tolist() == [sum(c[b] for c in counts) for b in range(num_b)]
    padded = [-(-t // align) * align for t in tokens.tolist()]  # each column's rows, aligned
    assert offsets.tolist() == [0] + [grouped_at[0, b] + padded[b] for b in range(num_b)]
    written = torch.zeros(grouped.shape[0], dtype=torch.bool)
    for (a, b), start in grouped_at.items():
        n = counts[a][b]
        assert torch.equal(grouped[start : start + n], packed[packed_at[a, b] : packed_at[a, b] + n])
        written[start : start + n] = True
    assert grouped[~written].isnan().all(), "a row outside every segment was written"
    back = torch.full_like(packed, float("nan"))
    ep._regroup(back, grouped, matrix, **layout, to_packed=True)
    for (a, b), start in packed_at.items():
        n = counts[a][b]
        assert torch.equal(back[start : start + n], packed[start : start + n])


def _listening() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in this network namespace (/proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                found.add(
                    ("127.0.0.1" if address == "0100007F" else address.rjust(width, "0"), int(port, 16))
                )
    return found


def listening_during_a_collective(rank, before):
    dist.barrier()
    during = _listening() - before if rank.rank == 0 else set()
    dist.barrier()
    return during


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp (Linux)")
def test_spawned_ranks_listen_on_loopback_only():
    before = _listening()
    outcomes = spawn(listening_during_a_collective, 2, args=(before,))
    new = _passed_results(outcomes, 2)[0]
    assert new, "the store and gloo listen somewhere: the probe must see them"
    assert all(address == "127.0.0.1" for address, _ in new), new


# --- the benchmark's own checks and clock -------------------------------------------------------------------


def _swap_two_experts_rows(monkeypatch):
    """ep_dispatch puts the first row of two experts' segments in each other's place (a layout bug), and
    ep_combine puts them back before its way home: identity experts cannot tell."""
    dispatch, combine = ep.ep_dispatch, ep.ep_combine
    swapped = []

    def bad_dispatch(*args, **kwargs):
        recv_x, handle = dispatch(*args, **kwargs)
        starts = handle.expert_offsets.tolist()
        a, b = [starts[e] for e, n in enumerate(handle.tokens_per_expert.tolist()) if n][:2]
        recv_x[[a, b]] = recv_x[[b, a]]
        swapped.append((a, b))
        return recv_x, handle

    def bad_combine(y, handle):
        a, b = swapped[-1]
        y[[a, b]] = y[[b, a]]
        return combine(y, handle)

    monkeypatch.setattr(ep, "ep_dispatch", bad_dispatch)
    monkeypatch.setattr(ep, "ep_combine", bad_combine)


def _one_rank():
    from bench.measure.distributed import Rank

    return Rank(0, 1, "gloo", torch.device("cpu"), None)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("mode", ["exact", "capacity-dedup"])
def test_time_ep_catches_a_row_laid_out_at_the_wrong_expert(group, monkeypatch, mode):
    shape = ep_case.EPShape(_TINY, world=1, tokens=8, mode=mode)
    assert collectives.time_ep(_one_rank(), shape, reps=1, warmup=0)["verified"]
    _swap_two_experts_rows(monkeypatch)
    assert not collectives.time_ep(_one_rank(), shape, reps=1, warmup=0)["verified"]


@pytest.mark.cpu_kernels
def test_dispatch_plus_combine_counts_the_host_work_between_stages(group, monkeypatch):
    """ep_combine's checks run between dispatch's last stage and combine's first: in no stage's time."""
    import time

    check = ep._check_combine
    monkeypatch.setattr(ep, "_check_combine", lambda y, handle: time.sleep(0.05) or check(y, handle))
    shape = ep_case.EPShape(_TINY, world=1, tokens=3, mode="capacity")
    mine = collectives.time_ep(_one_rank(), shape, reps=2, warmup=0)
    route = ep_case.STAGES.index("route")
    for stages, call in zip(mine["samples"], mine["call_samples"]):
        assert call - (sum(stages) - stages[route]) >= 50.0
    row = collectives.ep_mode_row(shape, [mine])
    assert float(row[-1].replace(",", "")) >= 50_000


def test_a_wrong_result_fails_the_dist_run(monkeypatch, tmp_path):
    """dist's rank 0 writes the results, then raises on any entry whose check failed, so the run exits
    non-zero and gpu-check's dist step (which reads the exit code) fails: a WRONG RESULT row alone said ok."""
    from types import SimpleNamespace

    from bench.commands import dist

    entry = {"name": "ep[x] total", "extra_info": {"verified": False}, "stats": {}}
    monkeypatch.setitem(dist.CASES, "ep", lambda rank, args: [entry])
    monkeypatch.setattr(dist.results, "write", lambda path, entries, machine: path)
    monkeypatch.setattr(dist, "_machine", lambda rank: {})
    args = SimpleNamespace(case="ep", reps=1, warmup=0, out=str(tmp_path / "ep.json"))
    with pytest.raises(RuntimeError, match=r"wrong result at ep\[x\] total"):
        dist.run_rank(_one_rank(), args)
    entry["extra_info"]["verified"] = True
    dist.run_rank(_one_rank(), args)


def test_expert_outputs_on_device_matches_the_host_version():
    x = randn((11, 5), torch.bfloat16, "cpu", generator(3))
    offsets = [0, 3, 3, 8]  # an empty expert; rows 8..10 padding
    on_device = ep_case.expert_outputs_on_device(x, torch.tensor(offsets, dtype=torch.int32), 4)
    assert_bitwise_equal(on_device[:8], ep_case.expert_outputs(x, offsets, 4)[:8], "rows")


def test_the_graph_total_reports_its_own_check():
    """A graph whose out was wrong is WRONG RESULT, whatever the eager calls found."""
    from bench.commands.dist import _ep_rows

    shape = ep_case.EPShape(_TINY, world=1, tokens=2, mode="capacity")
    samples = [[1.0] * len(ep_case.STAGES)]
    byte = {"bytes": 1, "useful": 1}
    mine = {
        "samples": samples,
        "call_samples": [9.5],
        "bytes": {stage: byte for stage in ep_case.STAGES},
        "verified": True,
        "graph_samples": [2.0],
        "graph_note": None,
        "graph_verified": False,
    }
    rows, entries = _ep_rows(shape, [mine], 1, torch.device("cuda"))
    assert entries[-1]["extra_info"]["stage"] == "total (CUDA graph)"
    total = entries[-2]  # the whole eager step is an entry too, not a table row only
    assert total["extra_info"]["stage"] == "total" and total["stats"]["median"] == pytest.approx(10.5e-3)
    assert entries[-1]["extra_info"]["verified"] is False and rows[-1][-1] == "WRONG RESULT"
    assert rows[-2][:2] == ["total", us(10.5e-3)]  # route + the whole call
    assert {e["extra_info"]["clock"] for e in entries} == {"cuda-events"}
    # gloo on CPUs reads the host clock, and says so: compare refuses it against a GPU's events
    _, on_cpu = _ep_rows(shape, [mine], 1, torch.device("cpu"))
    assert {(e["extra_info"]["timer"], e["options"]["timer"]) for e in on_cpu} == {("host", "host")}
