"""A function that writes its fixed inputs in place (an optimizer's update) replayed as a CUDA graph."""
import pickle

import pytest
import torch

from lowprec.cuda_graphs import GraphCache


def test_a_mutating_cache_survives_a_copy_as_an_empty_mutating_one():
    cache = GraphCache(max_graphs=3, max_bytes=10, mutating=True)
    cache.captures = 2
    other = pickle.loads(pickle.dumps(cache))
    assert (other.max_graphs, other.max_bytes, other.mutating, other.captures) == (3, 10, True, 0)


@pytest.mark.gpu
def test_a_mutating_function_runs_once_per_call_and_writes_where_its_state_is():
    """``state += step * g`` through a mutating cache: call 1 runs it as is, call 2 captures it (its
    warm-up does that call's work, no replay on top), calls 3 and 4 replay; after each call the
    state is exactly the sum of the steps so far (integers in fp32: exact), so no call ran twice or
    not at all. State at a new address gets a graph of its own and is written there, never a copy."""
    cache = GraphCache(mutating=True)

    def update(g, step, state):
        state.add_(g * step)

    state, total = torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda")
    for call in range(4):
        g = torch.full((1000,), float(call + 1), device="cuda")
        step = torch.tensor(2.0, device="cuda")
        cache(update, [g, step], [state], "add")
        total += 2 * (call + 1)
        assert torch.equal(state, total), call
        assert (cache.captures, cache.replays) == ((0, 0), (1, 0), (1, 1), (1, 2))[call]
    other = torch.zeros(1000, device="cuda")
    for call in range(3):
        cache(update, [torch.ones(1000, device="cuda"), torch.tensor(1.0, device="cuda")], [other], "add")
        assert torch.equal(other, torch.full((1000,), call + 1.0, device="cuda"))
    assert (cache.captures, cache.replays, cache.moves) == (2, 3, 0)
    assert torch.equal(state, total)  # the first state's graph did not run for the second
