"""One device for the run, uint8 records, the per-batch pipeline and the clear failures (DESIGN §2, §9)."""
import gc
import json
import weakref

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, tiny_config

from evaluations.cli import main
from pfedpg.data import resize_images
from pfedpg.data.pipeline import InputPipeline, crop_flip, random_resized_crop
from pfedpg.errors import ConfigError
from pfedpg.models.device import is_out_of_memory, resolve_device
from pfedpg.run import Trainer


def _legacy(images: np.ndarray, mean, std) -> torch.Tensor:
    """What the runner held before records stayed uint8: every record normalised once, up front."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def test_the_per_batch_pipeline_gives_the_preloaded_tensors_bit_for_bit():
    """augment: none — the embedded default's records through the pipeline equal the old float copy,
    batch by batch; records stored larger and resized per batch equal the old load-time resize."""
    cfg = tiny_config()
    t = Trainer(cfg, run_dir="unused")
    mean, std = cfg.model.mean, cfg.model.std
    from pfedpg.run import client_indices, partition_run

    dataset, splits, _ = partition_run(cfg)
    for n, split in enumerate(splits):
        train, evaluated = client_indices(cfg, split)
        for idx, (x, _) in ((train, t.clients.records.train_data[n]), (evaluated, t.clients.records.test_data[n])):
            assert x.dtype == torch.uint8  # the client holds uint8 records, no float copy
            old = _legacy(dataset.images[idx], mean, std)
            assert torch.equal(t.clients.model.prepare(x), old)
            assert torch.equal(t.clients.model.prepare(x[3:11]), old[3:11])  # any batch of them
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=(20, 24, 24, 3), dtype=np.uint8)
    pipe = InputPipeline(image_size=16, mean=mean, std=std)
    assert torch.equal(pipe(_nchw(big)), _legacy(resize_images(big, size=16), mean, std))
    assert torch.equal(pipe(_nchw(big[5:9])), _legacy(resize_images(big[5:9], size=16), mean, std))


def test_seeded_augmentation_is_reproducible_and_only_moves_pixels():
    rng = np.random.default_rng(1)
    x = _nchw(rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    for augment in ("crop_flip", "random_resized_crop"):
        pipe = InputPipeline(image_size=16, mean=[0.5] * 3, std=[0.5] * 3, augment=augment)
        a = pipe(x, torch.Generator().manual_seed(3))
        b = pipe(x, torch.Generator().manual_seed(3))
        c = pipe(x, torch.Generator().manual_seed(4))
        assert a.shape == (12, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
        assert not torch.equal(a, pipe(x))  # without a generator (evaluation): no augmentation
    # crop_flip gathers pixels of the (reflect-padded) image: every output value is an input value.
    out = crop_flip(x.float(), torch.Generator().manual_seed(0))
    for i in range(len(x)):
        assert set(out[i].unique().tolist()) <= set(x[i].float().unique().tolist())
    # random_resized_crop goes straight to the model's size (here a 24×24 input from 16×16 records).
    assert random_resized_crop(x.float(), 24, torch.Generator().manual_seed(0)).shape == (12, 3, 24, 24)
    # A box of a quarter of the area, sampled at its own size: exactly one 8×8 window of the image, or
    # its mirror; the whole image: the image or its mirror.
    crops = random_resized_crop(x.float(), 8, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1, 1))
    whole = random_resized_crop(x.float(), 16, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    for i in range(len(x)):
        windows = [x[i, :, r:r + 8, c:c + 8].float() for r in range(9) for c in range(9)]
        assert any(torch.allclose(crops[i], w, atol=1e-3) or torch.allclose(crops[i], w.flip(-1), atol=1e-3)
                   for w in windows)
        assert torch.allclose(whole[i], x[i].float(), atol=1e-3) or \
            torch.allclose(whole[i], x[i].float().flip(-1), atol=1e-3)


def _losses(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r.get("train_loss"), r.get("loss_adapted")) for r in rows if r["type"] == "client"]


def test_augmented_runs_reproduce_and_resume_exactly(tmp_path):
    cfg = tiny_config(rounds=3, **{"data.augment": "crop_flip"})
    Trainer(cfg, run_dir=tmp_path / "a").run()
    Trainer(cfg, run_dir=tmp_path / "b").run()
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert Trainer(cfg, run_dir=tmp_path / "c").run(stop_after=1) is None
    Trainer(cfg, run_dir=tmp_path / "c").run(resume=True)
    assert _losses(tmp_path / "c") == _losses(tmp_path / "a")
    Trainer(tiny_config(rounds=3), run_dir=tmp_path / "d").run()
    plain, aug = _losses(tmp_path / "d"), _losses(tmp_path / "a")
    # The augmentation changes training (losses), never evaluation of the same model (round 1 starts equal).
    assert [r[1] for r in plain] != [r[1] for r in aug]


def _npz(path, size):
    rng = np.random.default_rng(0)
    n = 120
    np.savez(path, images=rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
             labels=np.arange(n) % 4, domains=np.arange(n) % 3, class_names=np.array(["a", "b", "c", "d"]),
             domain_names=np.array(["x", "y", "z"]))
    return str(path)


def test_memory_does_not_grow_with_the_model_input_size(tmp_path, monkeypatch):
    """The same 8×8 records at input 8 and at input 32: the clients hold the same uint8 bytes."""
    import pfedpg.run.trainer as trainer_module

    path = _npz(tmp_path / "d.npz", 8)
    held, pools = [], []
    load_records = trainer_module.load_records

    def watched(cfg):
        records, dataset = load_records(cfg)
        pools.append(weakref.ref(dataset))
        return records, dataset

    monkeypatch.setattr(trainer_module, "load_records", watched)
    for size in (8, 32):
        cfg = tiny_config(**{"data.source": "npz", "data.path": path, "data.image_size": size, "data.num_domains": 4,
                             "data.public_fraction": 0.0, "model.kwargs.img_size": size})
        t = Trainer(cfg, run_dir=tmp_path / f"r{size}")
        gc.collect()
        assert pools[-1]() is None  # the pool is not kept beside the clients' records
        records = t.clients.records
        tensors = [x for pair in (*records.train_data, *records.test_data) for x in pair[:1]]
        assert all(x.dtype == torch.uint8 and x.shape[-1] == 8 for x in tensors)
        held.append(sum(x.numel() * x.element_size() for x in tensors))
        assert t.clients.model.prepare(records.train_data[0][0][:2]).shape == (2, 3, size, size)
    assert held[0] == held[1]
    assert Trainer(cfg, run_dir=tmp_path / "run").run()["accuracy"]["mean"] >= 0  # trains at 32 from 8×8 records


def test_device_and_amp_mistakes_are_one_line(tmp_path, capsys):
    for argv, text in (
        (["--set", "device=tpu"], "device='tpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--set", "amp=fp16"], "amp='fp16' is not one of bf16"),
        (["--set", "device=cpu", "--set", "amp=bf16"], "amp: bf16 autocasts on CUDA only; drop amp on device: cpu"),
        (["--set", "data.augment=mixup"],
         "data.augment: got 'mixup'; must be one of none, crop_flip, random_resized_crop"),
    ):
        assert main(["train", *argv, "--run-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, capsys):
    for argv, text in ((["--set", "device=cuda"], "device=cuda but torch sees no CUDA device here; set device: cpu"),
                       (["--set", "amp=bf16"], "amp: bf16 autocasts on CUDA only, and device=auto is the CPU")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({"rounds": 1, "model": {"weights": "random", "kwargs": TINY_MODEL},
                                   "data": {"image_size": 8}}))
        assert main(["train", "--config", str(cfg), *argv, "--run-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err, err
        assert main(["plan", "--config", str(cfg), *argv]) == 2
        assert text in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="cuda:1 but torch sees no CUDA"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_out_of_memory_is_one_line_and_leaves_nothing_that_blocks_a_rerun(tmp_path, capsys, monkeypatch):
    import pfedpg.client as client

    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"rounds": 2, "checkpoint_every": 1, "model": {"weights": "random", "kwargs": TINY_MODEL},
                               "data": {"image_size": 8, "max_train_per_client": 16, "max_test_per_client": 8}}))
    real = client.sgd_local_training
    calls = []

    def exhausted(job, cfg):
        calls.append(job.round)
        if job.round == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(job, cfg)

    monkeypatch.setattr("pfedpg.run.inprocess.sgd_local_training", exhausted)
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or all(not ln.startswith("error") for ln in err[:-1])
    assert "out of GPU memory" in err[-1] and "client.batch_size" in err[-1] and "attempt-1" in err[-1]
    assert not (run / "metrics.jsonl").exists() and (run / "attempt-1" / "checkpoints").is_dir()
    monkeypatch.setattr("pfedpg.run.inprocess.sgd_local_training", real)
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0  # the same command runs
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 123 bytes")) == "host"
    assert is_out_of_memory(RuntimeError("shape mismatch")) is None


def test_plan_of_a_run_and_of_a_grid(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"rounds": 3, "model": {"weights": "random", "kwargs": TINY_MODEL},
                               "data": {"image_size": 8, "max_train_per_client": 40, "max_test_per_client": 20},
                               "client": {"batch_size": 16, "local_epochs": 2}}))
    assert main(["plan", "--config", str(cfg), "--steps", "1", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    run = p["runs"][0]
    n = p["data"]["clients"]
    steps = sum(2 * -(-t // 16) for t in p["data"]["train_per_client"])  # E · ⌈|D_n| / B⌉, every client
    assert run["train_steps"] == 3 * steps and run["dp_steps"] == 0
    assert run["eval_records"] == 3 * 2 * sum(p["data"]["eval_per_client"])  # adapted + generated, 3 rounds
    assert run["numbers_sent"] == 3 * n * p["communication"]["numbers_per_client_round"]
    assert p["measured"]["train_step_s"] > 0 and p["measured"]["host_peak_bytes"] > 0
    assert p["measured"]["device"] in ("cpu", "cuda:0") and not (tmp_path / "runs").exists()
    grid = tmp_path / "sweep.yaml"
    grid.write_text(json.dumps({"base_config": str(cfg), "privacy": {
        "seeds": [0, 1], "mechanisms": {"dp_sgd": {"clip": 1.0}}, "target_epsilons": None, "noise_multipliers": [1.0],
        "baselines": ["local"], "out_dir": str(tmp_path / "sweep")}}))
    assert main(["plan", "--config", str(grid), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "privacy: 4 runs" in out and "ms per DP-SGD step" in out and "| local-s1 | local | 1 |" in out
    assert not (tmp_path / "sweep").exists()  # a plan runs nothing
