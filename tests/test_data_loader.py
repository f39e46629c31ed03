"""The loader: reads across shards, samples reproducibly, resumes exactly, keeps ranks apart.

The splits here hold token i at position i (uint32), so a batch's values are its positions.
"""

import io
import json

import numpy as np
import pytest
import torch

from data.loader import EpochWindows, RandomWindows, TokenSplit, build_loader, eval_starts, eval_windows
from common.errors import UserError

CPU = torch.device("cpu")


def make_split(tmp_path, shard_sizes, split="train"):
    """A prepared folder whose split is arange(total) cut into shards of the given sizes."""
    start, shards = 0, []
    for i, n in enumerate(shard_sizes):
        name = f"{split}_{i:06d}.bin"
        np.arange(start, start + n, dtype="<u4").tofile(tmp_path / name)
        shards.append({"file": name, "tokens": n})
        start += n
    meta = {"dtype": "uint32", "splits": {split: shards}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return TokenSplit(tmp_path, split)


def test_read_spans_shard_boundaries(tmp_path):
    data = make_split(tmp_path, [5, 3, 0, 7])
    assert data.num_tokens == 15
    for start in range(15):
        for length in range(1, 16 - start):
            assert data.read(start, length).tolist() == list(range(start, start + length))


def test_random_batches_are_windows_and_may_cross_shards(tmp_path):
    data = make_split(tmp_path, [40, 40])
    loader = RandomWindows(data, batch_size=64, block_size=8, seed=0, device=CPU)
    crossed = False
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (64, 8)
        assert torch.equal(y, x + 1)  # consecutive positions: a true window, targets shifted by one
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)
        assert int(x.min()) >= 0 and int(y.max()) < 80
        crossed |= bool(((x[:, 0] < 40) & (y[:, -1] >= 40)).any())
    assert crossed


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_state_resumes_exactly_with_prefetch(tmp_path, sampling):
    data = make_split(tmp_path, [300, 200])
    make = lambda: build_loader(sampling, data, batch_size=7, block_size=10, seed=3, device=CPU)
    a = make()
    for _ in range(9):  # epoch mode: 49 windows, so this crosses into the second epoch
        a.next_batch()
    # The state survives a checkpoint round trip (plain data, weights_only).
    buf = io.BytesIO()
    torch.save({"loader": a.state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["loader"]
    expected = [a.next_batch() for _ in range(6)]

    b = make()
    b.next_batch()  # a loader that already prefetched from elsewhere must drop that batch
    b.load_state(state)
    for x, y in expected:
        bx, by = b.next_batch()
        assert torch.equal(bx, x) and torch.equal(by, y)


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_state_counts_handed_batches_not_prefetched_ones(tmp_path, sampling):
    data = make_split(tmp_path, [500])
    plain_cls = RandomWindows if sampling == "random" else EpochWindows
    prefetching = plain_cls(data, 4, 8, 1, CPU, prefetch=True)  # build_loader prefetches on CUDA only
    plain = plain_cls(data, 4, 8, 1, CPU, prefetch=False)
    assert prefetching.state() == plain.state()
    for _ in range(3):
        x1, _ = prefetching.next_batch()
        x2, _ = plain.next_batch()
        assert torch.equal(x1, x2)
        assert prefetching.state() == plain.state()


def test_random_seed_changes_stream(tmp_path):
    data = make_split(tmp_path, [1000])
    a = RandomWindows(data, 8, 4, seed=0, device=CPU).next_batch()[0]
    b = RandomWindows(data, 8, 4, seed=1, device=CPU).next_batch()[0]
    assert not torch.equal(a, b)


def test_random_ranks_read_disjoint_windows_that_make_up_the_one_process_batch(tmp_path):
    data = make_split(tmp_path, [600, 400])  # token i sits at position i: a row's first token is its start
    one = RandomWindows(data, 48, 5, seed=0, device=CPU)
    ranks = [RandomWindows(data, 16, 5, seed=0, device=CPU, rank=r, world_size=3) for r in range(3)]
    for _ in range(20):
        starts = [loader.next_batch()[0][:, 0].tolist() for loader in ranks]
        assert len(set().union(*starts)) == 48  # no window read by two ranks in a step
        assert sum(starts, []) == one.next_batch()[0][:, 0].tolist()
    for loader in ranks:
        assert loader.state() == {"sampling": "random", "batches": 20, "grad_accum": 1}  # the same on every rank


def test_epoch_visits_every_window_once_per_epoch_across_ranks(tmp_path):
    T, W = 10, 2
    data = make_split(tmp_path, [123, 80])  # 202 // 10 = 20 windows, 10 per rank
    firsts = {}
    for rank in range(W):
        loader = EpochWindows(data, 5, T, seed=7, device=CPU, rank=rank, world_size=W)
        epoch0 = torch.cat([loader.next_batch()[0] for _ in range(2)])
        assert loader.state() == {"sampling": "epoch", "epoch": 0, "position": 10}
        epoch1 = torch.cat([loader.next_batch()[0] for _ in range(2)])
        firsts[rank] = (epoch0[:, 0].tolist(), epoch1[:, 0].tolist())
        assert torch.equal(epoch0[:, 1:], epoch0[:, :-1] + 1)
    for epoch in (0, 1):
        starts = firsts[0][epoch] + firsts[1][epoch]
        assert sorted(starts) == [i * T for i in range(20)]  # each window once, ranks disjoint
    assert firsts[0][0] != firsts[0][1]  # a fresh order each epoch


def test_too_short_for_one_window(tmp_path):
    data = make_split(tmp_path, [8])
    with pytest.raises(UserError, match="block_size"):
        RandomWindows(data, 2, 8, 0, CPU)
    with pytest.raises(UserError, match="block_size"):
        EpochWindows(data, 2, 8, 0, CPU)
    with pytest.raises(UserError, match="data.sampling"):
        build_loader("shuffle", data, 2, 4, 0, CPU)


def test_load_state_refuses_other_sampling(tmp_path):
    data = make_split(tmp_path, [100])
    with pytest.raises(UserError, match="sampling"):
        build_loader("epoch", data, 2, 4, 0, CPU).load_state({"sampling": "random", "batches": 3})


def test_eval_windows_cover_the_split_and_split_across_ranks(tmp_path):
    data = make_split(tmp_path, [25, 26])  # 50 // 7 = 7 windows
    starts = eval_starts(data, 7)
    assert starts.tolist() == [i * 7 for i in range(7)]
    assert [int(row[0]) for x, _ in eval_windows(data, starts, 3, 7, CPU) for row in x] == starts.tolist()
    # 2 ranks: 4 and 3 windows, in 2 batches each (FSDP's forwards pair up); rank 1's second
    # batch is padding whose targets all count nothing.
    by_rank = [list(eval_windows(data, starts, 3, 7, CPU, rank=k, world_size=2)) for k in range(2)]
    assert [len(b) for b in by_rank] == [2, 2]
    counted = [int(x[i, 0]) for b in by_rank for x, y in b for i in range(len(x)) if (y[i] != -1).all()]
    assert sorted(counted) == starts.tolist()
    assert (by_rank[1][1][1] == -1).all()
    sample = eval_starts(data, 7, max_windows=3)
    assert len(sample) == 3 and set(sample) <= set(starts) and np.array_equal(sample, eval_starts(data, 7, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, non_blocking copies)")
@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_cuda_batches_match_cpu(tmp_path, sampling):
    data = make_split(tmp_path, [700, 300])
    gpu = build_loader(sampling, data, 8, 16, seed=5, device=torch.device("cuda"))
    cpu = build_loader(sampling, data, 8, 16, seed=5, device=CPU)
    for _ in range(10):
        (gx, gy), (cx, cy) = gpu.next_batch(), cpu.next_batch()
        assert gx.is_cuda and torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)
    assert gpu.state() == cpu.state()
