"""The row-wise Adam against PyTorch's own Adam: the same steps on the rows it touches; and
the players' stacked moments against one row-wise Adam per table."""

from __future__ import annotations

import torch

from xmlgame.optim import RowAdam, StackedMoments, step_table_rows


def test_row_steps_equal_sparse_adam_and_leave_other_rows_alone():
    torch.manual_seed(0)
    ours = torch.nn.Embedding(12, 5, sparse=True)
    theirs = torch.nn.Embedding(12, 5, sparse=True)
    theirs.load_state_dict(ours.state_dict())
    row_adam = RowAdam(ours.parameters(), lr=0.05)
    sparse_adam = torch.optim.SparseAdam(theirs.parameters(), lr=0.05, eps=1e-8)
    untouched = ours.weight.detach()[11].clone()
    for step in range(6):
        rows = torch.tensor([step % 3, 3 + step % 2, 7, 10 - step % 2])  # distinct
        grad_rows = torch.randn(len(rows), 5) * (10.0 ** (step - 3))  # tiny to large gradients
        step_table_rows(row_adam, ours, rows, grad_rows)
        theirs.weight.grad = torch.sparse_coo_tensor(rows[None], grad_rows, (12, 5),
                                                     check_invariants=True)
        sparse_adam.step()
        # Adam's epsilon sits inside the bias correction in RowAdam: a relative 1e-8 apart
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.weight.detach()[11], untouched)


def test_dense_gradients_take_a_dense_adam_step():
    torch.manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(4, 3))
    theirs = torch.nn.Parameter(ours.detach().clone())
    row_adam = RowAdam([ours], lr=0.1)
    adam = torch.optim.Adam([theirs], lr=0.1)
    for _ in range(5):
        grad = torch.randn(4, 3)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        row_adam.step()
        adam.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_stacked_moments_step_as_one_row_adam_per_table_and_share_its_state():
    """Three tables, one of them empty; the second table misses one step (its step size then
    differs from the first's). Steps through the stack, and through each table's own RowAdam
    afterwards, equal per-table steps to the bit; a state saved and loaded through the
    per-table optimizers carries on the same after :meth:`StackedMoments.stack`."""
    torch.manual_seed(2)
    sizes = [6, 0, 4]
    ours = [torch.nn.Embedding(n, 3, sparse=True) for n in sizes]
    theirs = [torch.nn.Embedding(n, 3, sparse=True) for n in sizes]
    for a, b in zip(ours, theirs):
        b.load_state_dict(a.state_dict())
    make = lambda tables: [RowAdam(t.parameters(), lr=0.05) if t.num_embeddings else None  # noqa: E731
                           for t in tables]
    our_opts, their_opts = make(ours), make(theirs)
    stack = StackedMoments(our_opts, ours)
    offsets = [0, 6, 6]

    def step(rows_of: dict) -> None:
        stack.advance(list(rows_of))
        grads = {i: torch.randn(len(rows), 3) for i, rows in rows_of.items()}
        stacked = torch.cat([rows + offsets[i] for i, rows in rows_of.items()])
        tables = torch.cat([torch.full((len(r),), i) for i, r in rows_of.items()])
        current = torch.cat([ours[i].weight.detach()[rows] for i, rows in rows_of.items()])
        new = stack.update(stacked, torch.cat(list(grads.values())), current, tables)
        start = 0
        for i, rows in rows_of.items():
            with torch.no_grad():
                ours[i].weight[rows] = new[start:start + len(rows)]
            start += len(rows)
            step_table_rows(their_opts[i], theirs[i], rows, grads[i])

    def check() -> None:
        for a, b in zip(ours, theirs):
            assert torch.equal(a.weight, b.weight)

    step({0: torch.tensor([0, 2, 5]), 2: torch.tensor([1, 3])})
    step({0: torch.tensor([1, 2])})  # table 2 misses a step
    step({0: torch.tensor([0, 4]), 2: torch.tensor([0, 3])})  # step sizes now differ
    check()
    # a step through a table's own optimizer moves the stacked moments too
    rows, grad = torch.tensor([2, 3]), torch.randn(2, 3)
    step_table_rows(our_opts[0], ours[0], rows, grad)
    step_table_rows(their_opts[0], theirs[0], rows, grad)
    check()
    states = [o.state_dict() for o in our_opts if o is not None]
    for optimizer, state in zip([o for o in our_opts if o is not None], states):
        optimizer.load_state_dict({**state, "state": {k: {n: v.clone() if torch.is_tensor(v)
                                                          else v for n, v in e.items()}
                                                      for k, e in state["state"].items()}})
    stack.stack()
    step({0: torch.tensor([3, 5]), 2: torch.tensor([2])})
    check()
