"""The two-process side of ``test_distributed.py``, run once per test module under torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_jobs.py SPEC``
runs every job below on both processes, in order (one launch: starting processes costs more
than the jobs), and writes what the tests check into the folder the JSON file ``SPEC`` names.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from xmlgame.dataset import load_dataset
from xmlgame.distributed import Communicator, split_sizes
from xmlgame.errors import XmlgameError
from xmlgame.train import TrainConfig, Trainer, train


class Interrupted(Exception):
    """Stands for a crash after a checkpoint: raised on every process at the same point."""


def communicator_checks(comm: Communicator) -> dict:
    """Collectives with uneven and empty shares; returns what this process saw."""
    out = {"split_1_of_2": split_sizes(1, 2), "block_of_1": [comm.block(1).start,
                                                            comm.block(1).stop]}
    # variable-length gather: process 0 holds one row, process 1 none
    rows = torch.arange(3.0).reshape(1, 3) if comm.rank == 0 else torch.zeros(0, 3)
    out["gather_one_and_none"] = comm.all_gather_rows(rows).tolist()
    out["gather_none"] = list(comm.all_gather_rows(torch.zeros(0, 2)).shape)
    ids = torch.tensor([10 * comm.rank + i for i in range(comm.rank + 2)])
    out["gather_uneven"] = comm.all_gather_rows(ids).tolist()
    # sparse row gradients whose row sets differ (process 1 has none on the second table)
    table = torch.nn.Parameter(torch.zeros(6, 2))
    if comm.rank == 0:
        table.grad = torch.sparse_coo_tensor([[1, 3, 3]], [[1.0, 1], [2, 2], [3, 3]], (6, 2))
    else:
        table.grad = torch.sparse_coo_tensor([[3, 5]], [[10.0, 10], [20, 20]], (6, 2))
    empty = torch.nn.Parameter(torch.zeros(4, 2))
    if comm.rank == 0:
        empty.grad = torch.sparse_coo_tensor([[2]], [[5.0, 5]], (4, 2))
    dense = torch.nn.Parameter(torch.zeros(2))
    dense.grad = torch.full((2,), float(comm.rank + 1))
    comm.sync_gradients_([table, empty], [dense])
    out["sparse_sum"] = table.grad.to_dense().tolist()
    out["sparse_one_sided"] = empty.grad.to_dense().tolist()
    out["dense_sum"] = dense.grad.tolist()
    out["broadcast"] = comm.broadcast_object(f"from {comm.rank}")
    try:
        comm.on_main(lambda: (_ for _ in ()).throw(XmlgameError("main says no")))
    except XmlgameError as error:
        out["on_main_error"] = str(error)
    return out


def interrupt_after(saves: int):
    """Make Trainer.save_checkpoint raise Interrupted after ``saves`` saves; returns an undo."""
    real = Trainer.save_checkpoint
    calls = {"n": 0}

    def save(self, state):
        calls["n"] += 1
        if calls["n"] > saves:
            raise Interrupted
        return real(self, state)

    Trainer.save_checkpoint = save
    return lambda: setattr(Trainer, "save_checkpoint", real)


def head_allocation(dataset, config: TrainConfig, folder: Path) -> dict:
    """Rows of each player table this process allocated, and its head bytes after an epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(dataset, config, folder, progress=False)
    trainer.setup()
    trainer.run_epoch(0)
    players = trainer.model.players
    return {
        "held": list(trainer.parallel.players),
        "rows": [table.weight.shape[0] for table in players.tables],
        "dim": players.dim,
        "head_bytes": trainer.parallel.head_bytes(trainer.model, trainer.opt),
    }


def evaluation(comm: Communicator, run_dir: Path, dataset, batch_size: int) -> dict:
    """Predictions of a trained run on the test split, data- and label-parallel."""
    from xmlgame.metrics import TopK, compute_metrics
    from xmlgame.model import XmlModel, load
    from xmlgame.parallel import Parallel

    single = load(run_dir)
    features = single.featurize(list(dataset.test.texts), progress=False)
    out = {}
    for mode in ("data", "label"):
        parallel = Parallel(comm, single.shards.n_players, label_parallel=mode == "label")
        model = single
        if mode == "label":
            model = XmlModel(single.encoder_config, single.shards, single.vocab,
                             held_players=parallel.held_players)
            model.load_weights(run_dir / "model.safetensors")
            # the same label indexes: predictions go through the shortlist, scored label-parallel
            model.shortlister = single.shortlister
            model.shortlist_k, model.shortlist_weight = single.shortlist_k, single.shortlist_weight
            parallel.attach(model)
            out["label_rows"] = [t.weight.shape[0] for t in model.players.tables]
        for name, subset in (("all", np.arange(len(features))), ("first3", np.arange(3))):
            prediction = parallel.predict(model, features.subset(subset), k=5,
                                          batch_size=batch_size)
            metrics = compute_metrics(
                TopK(prediction.label_ids, prediction.scores), dataset.test.Y[subset],
                dataset.train_counts, dataset.meta["counts"]["train_docs"],
                *dataset.propensity_ab,
            )
            out[f"{mode}_{name}"] = {"ids": prediction.label_ids.tolist(),
                                     "scores": prediction.scores.tolist(), "metrics": metrics}
    return out


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    comm = Communicator.current()
    assert comm.world_size == 2, comm
    results = {"rank": comm.rank, "communicator": communicator_checks(comm)}
    dataset = load_dataset(spec["dataset"])
    config = TrainConfig(**spec["config"])

    # training, data-parallel and label-parallel (with two micro-batches per batch)
    results["data_parallel"] = train(dataset, config, out / "data-parallel", progress=False)
    label = replace(config, label_parallel=True, grad_accum=2)
    results["label_parallel"] = train(dataset, label, out / "label-parallel", progress=False)

    # a one-process run, interrupted after its second epoch, resumed here in both modes
    results["resumed"] = train(dataset, config, Path(spec["interrupted"]), resume=True,
                               progress=False)
    results["resumed_label_parallel"] = train(dataset, label, Path(spec["interrupted_copy"]),
                                              resume=True, progress=False)
    # runs interrupted here, for the test to resume in one process
    results["interrupted_here"] = []
    results["hard_negatives_after_2"] = {}
    for name, settings in (("interrupted", config), ("interrupted-label-parallel", label)):
        undo = interrupt_after(2)
        try:
            train(dataset, settings, out / name, progress=False)
        except Interrupted:
            results["interrupted_here"].append(name)
        undo()
        mined = np.load(out / name / "checkpoint" / "hard_negatives.npy")
        results["hard_negatives_after_2"][name] = mined.tolist()

    results["head"] = head_allocation(
        dataset, replace(config, players=4, label_parallel=True, epochs=1), out / "head"
    )
    results["head_data_parallel"] = head_allocation(
        dataset, replace(config, players=4, epochs=1), out / "head-data-parallel"
    )
    results["evaluation"] = evaluation(comm, Path(spec["reference"]), dataset,
                                       spec["eval_batch"])
    (out / f"rank{comm.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
