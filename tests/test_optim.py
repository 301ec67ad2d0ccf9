"""The row-wise Adam against PyTorch's own Adam: the same steps on the rows it touches."""

from __future__ import annotations

import torch

from xmlgame.optim import RowAdam, step_table_rows


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
