"""Issue 31, many clients in one process: what keeps per-client memory small must give the same
numbers as before, bit for bit (the sizes and times themselves are measured in bench/scale.py)."""
import torch
from conftest import tiny_config

from pfedpg.run import Trainer
from pfedpg.run.data import client_tensors, load_records, partition_run


def test_in_process_records_are_rows_of_one_store_equal_to_the_per_client_tensors():
    cfg = tiny_config(**{"data.new_clients": 1, "data.max_test_per_client": 7})
    records, dataset = load_records(cfg)
    _, splits, new = partition_run(cfg)
    store = records.train_data.images
    assert len(records.train_data) == len(records.test_data) == len(splits) == 2
    assert len(records.new_train_data) == len(records.new_test_data) == len(new) == 1
    for train, test, held in ((records.train_data, records.test_data, splits),
                              (records.new_train_data, records.new_test_data, new)):
        for n, split in enumerate(held):
            for (x, y), (x0, y0) in zip((train[n], test[n]), client_tensors(cfg, dataset, split)):
                assert x.dtype == x0.dtype == torch.uint8 and y.dtype == y0.dtype == torch.int64
                assert torch.equal(x, x0) and torch.equal(y, y0) and x.is_contiguous() and y.is_contiguous()
                assert x.untyped_storage().data_ptr() == store.untyped_storage().data_ptr()  # a view, no copy
    # list-like: iteration, negative indices and slices give the same pairs
    pairs = [*records.train_data]
    assert len(pairs) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(pairs, records.train_data[:]))
    assert torch.equal(records.train_data[-1][0], pairs[1][0])
    # client by client, training then evaluated records: every record once
    assert store.shape[0] == sum(len(y) for pair in (*records.train_data, *records.test_data,
                                                    *records.new_train_data, *records.new_test_data)
                                 for y in pair[1:])


def test_the_generated_prompt_spread_is_the_mean_off_diagonal_distance():
    """Without the two N × N masks: the same value as ``cdist(p, p)[~eye].mean() / mean norm``."""
    t = Trainer(tiny_config(**{"data.num_domains": 4}), run_dir="unused")
    _, spread = t.loop.evaluate_all(1)
    generated = t.loop.generated_prompts()
    p = torch.stack([generated[n].reshape(-1) for n in sorted(generated)])
    dist = torch.cdist(p, p)
    off = dist[~torch.eye(len(p), dtype=torch.bool)]
    assert len(p) == 4 and spread == float(off.mean() / p.norm(dim=1).mean().clamp_min(1e-12))


def test_all_finite_is_the_entrywise_test():
    from pfedpg.run.rounds import all_finite

    big = torch.finfo(torch.float32).max
    cases = [torch.zeros(0), torch.randn(5, 3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]),
             torch.tensor([float("-inf"), float("inf")]), torch.tensor([big, big]),  # finite entries, the sum overflows
             torch.tensor([-big, -big, 1.0]), torch.full((3, 4), 2.0, dtype=torch.float64).requires_grad_()]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
