"""A row-wise ("lazy") Adam for parameters with sparse gradients.

``torch.optim.SparseAdam`` spends most of its time masking sparse tensors; this optimiser
gathers the touched rows once, updates their moments with index operations, and scatters them
back. Rows a step does not touch keep their moments unchanged (as in SparseAdam). It accepts
sparse gradients (embedding tables with ``sparse=True``) and dense ones (updating every row).
"""

from __future__ import annotations

import math

import torch


class RowAdam(torch.optim.Optimizer):
    """Adam applied only to the rows present in each (sparse) gradient."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step_rows(
        self, param: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor
    ) -> torch.Tensor:
        """One step on the given distinct ``rows`` of ``param`` with their gradient, directly:
        the same update as ``step`` with a sparse gradient, without building one. Returns the
        updated rows."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        return self._update_rows(param, rows, grad_rows, group)

    def _state(self, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        t = state["step"]
        size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        return state["exp_avg"], state["exp_avg_sq"], size

    def _update_rows(self, p, rows, g, group) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        m, v, size = self._state(p, group)
        m_rows = m.index_select(0, rows).lerp_(g, 1 - beta1)
        v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m.index_copy_(0, rows, m_rows)
        v.index_copy_(0, rows, v_rows)
        new_rows = p.index_select(0, rows).addcdiv_(
            m_rows, v_rows.sqrt_().add_(group["eps"]), value=-size
        )
        p.index_copy_(0, rows, new_rows)
        return new_rows

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()
                    self._update_rows(p, grad.indices()[0], grad.values(), group)
                else:
                    m, v, size = self._state(p, group)
                    m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)


def set_row_gradient(table: torch.nn.Embedding, rows: torch.Tensor, grad_rows: torch.Tensor):
    """Give a table the gradient ``grad_rows`` on ``rows`` (sparse or dense, as it expects)."""
    if table.sparse:
        table.weight.grad = torch.sparse_coo_tensor(
            rows[None], grad_rows, table.weight.shape, check_invariants=False
        )
    else:
        grad = torch.zeros_like(table.weight)
        grad[rows] = grad_rows  # rows are distinct: one pair per (label, player)
        table.weight.grad = grad


def step_table_rows(
    optimizer: RowAdam, table: torch.nn.Embedding, rows: torch.Tensor, grad_rows: torch.Tensor
) -> torch.Tensor:
    """One step of a table's optimizer with the gradient ``grad_rows`` on its distinct ``rows``;
    returns the updated rows. Sparse tables update those rows in place (no sparse tensor to
    build), dense ones take a dense step (every row's moments move)."""
    if table.sparse:
        return optimizer.step_rows(table.weight, rows, grad_rows)
    set_row_gradient(table, rows, grad_rows)
    optimizer.step()
    return table.weight.detach()[rows]
