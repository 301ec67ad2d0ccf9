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


class StackedMoments:
    """The Adam moments of several tables (the players'), stacked end to end in one pair of
    buffers, so that one update takes rows of every table at once.

    Each table keeps its own :class:`RowAdam` (``None`` for an empty table), whose state
    tensors become views into the stacked buffers: steps taken through either stay in step,
    and the optimizers' ``state_dict`` keeps its per-table layout. Loading a state replaces
    those tensors, so :meth:`stack` must run again after ``load_state_dict``.
    """

    def __init__(self, optimizers: list[RowAdam | None], tables: list[torch.nn.Embedding]):
        self.optimizers = optimizers
        self.params = [table.weight for table in tables]
        groups = [o.param_groups[0] for o in optimizers if o is not None]
        settings = {(g["lr"], tuple(g["betas"]), g["eps"]) for g in groups}
        if len(settings) > 1:
            raise ValueError(f"stacked tables need one learning rate, betas and eps: {settings}")
        self.lr, (self.beta1, self.beta2), self.eps = settings.pop() if settings else (1, (0, 0), 0)
        self.sizes: list[float] = [0.0] * len(tables)
        self.stack()

    def stack(self) -> None:
        """Build the stacked buffers from the optimizers' present states (zeros for a table
        not stepped yet) and make those states views into them."""
        for key in ("exp_avg", "exp_avg_sq"):
            parts = []
            for optimizer, param in zip(self.optimizers, self.params):
                state = optimizer.state[param] if optimizer is not None else {}
                parts.append(state[key] if key in state else torch.zeros_like(param))
            setattr(self, key, torch.cat(parts) if parts else torch.zeros(0))
        start = 0
        for optimizer, param in zip(self.optimizers, self.params):
            stop = start + param.shape[0]
            if optimizer is not None:
                state = optimizer.state[param]
                state.setdefault("step", 0)
                state["exp_avg"] = self.exp_avg[start:stop]
                state["exp_avg_sq"] = self.exp_avg_sq[start:stop]
            start = stop

    def advance(self, tables: list[int]) -> None:
        """Count one step for each of ``tables`` (those with rows in this batch) and set their
        step sizes (learning rate times Adam's bias corrections), as :class:`RowAdam` would."""
        for i in tables:
            state = self.optimizers[i].state[self.params[i]]
            state["step"] += 1
            t = state["step"]
            self.sizes[i] = self.lr * math.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, grad_rows: torch.Tensor, current: torch.Tensor,
               tables: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """One Adam step of the distinct stacked ``rows`` (the same update as
        :meth:`RowAdam.step_rows` on each table), with their gradient, their present values
        ``current`` and the table of each (``tables``, sorted); the step sizes are those of
        the last :meth:`advance`. Updates the moments (unless ``keep`` is False: a look at the
        step a later call will take); returns the new rows (the caller writes them to the
        tables)."""
        m = self.exp_avg.index_select(0, rows).lerp_(grad_rows, 1 - self.beta1)
        v = self.exp_avg_sq.index_select(0, rows).mul_(self.beta2)
        v.addcmul_(grad_rows, grad_rows, value=1 - self.beta2)
        if keep:
            self.exp_avg.index_copy_(0, rows, m)
            self.exp_avg_sq.index_copy_(0, rows, v)
        denominator = v.sqrt_().add_(self.eps)
        present = torch.unique_consecutive(tables).tolist()
        sizes = {self.sizes[i] for i in present}
        if len(sizes) == 1:  # the usual case: every table has stepped as often
            return current.addcdiv(m, denominator, value=-sizes.pop())
        new = current.clone()
        ends = torch.searchsorted(tables, torch.tensor(present).to(tables), right=True).tolist()
        start = 0
        for i, stop in zip(present, ends):
            new[start:stop].addcdiv_(m[start:stop], denominator[start:stop], value=-self.sizes[i])
            start = stop
        return new
