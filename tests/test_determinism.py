"""Run-to-run determinism on 2 threads (issue 17): two identical runs give the same losses and weights bit for bit.

The ALBEF recipe used to differ in the last bits from step 3 on: the backward of ITM's hard-negative gather
``x[index]`` (``index_put_`` with accumulate) adds the repeated rows with parallel atomics on 2+ threads.
"""
import json

import torch
from safetensors.torch import load_file

from polyalign.app.training import train
from polyalign.config import load_config
from polyalign.models.fusion import take_rows

FAST = ["train.max_steps=6", "train.checkpoint_every=6", "train.threads=2", "eval.rerank_k=0", "eval.n_examples=0",
        "eval.probe_max_train=32", "data.val_size=32", "data.test_size=32"]


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def test_take_rows_backward_is_the_same_on_every_call_and_thread_count():
    torch.manual_seed(0)
    x = torch.randn(32, 256, 32, requires_grad=True)  # ITM's image tokens (B, N, D): over index_put_'s grain size
    index, grad = torch.randint(0, 4, (32,)), torch.randn(32, 256, 32)  # many repeats: the atomics' adds collide
    grads = set()
    before = _threads(2)
    try:
        for threads in [2] * 100 + [1]:
            torch.set_num_threads(threads)
            x.grad = None
            take_rows(x, index).backward(grad)
            grads.add(x.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(before)
    assert len(grads) == 1
    assert torch.equal(take_rows(x, index), x[index])


def _run(tmp_path, name, tiny_overrides):
    before = torch.get_num_threads()  # train.threads sets the process's thread count
    try:
        train(load_config("configs/albef-shapes.yaml", tiny_overrides + FAST), tmp_path / name, show_progress=False)
    finally:
        torch.set_num_threads(before)
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return ([{k: v for k, v in row.items() if k not in ("samples_per_s", "data_frac")} for row in log],
            load_file(tmp_path / name / "checkpoints" / "step-000006.safetensors"))


def test_two_albef_runs_on_two_threads_are_identical(tmp_path, tiny_overrides):
    log_a, weights_a = _run(tmp_path, "a", tiny_overrides)
    log_b, weights_b = _run(tmp_path, "b", tiny_overrides)
    assert log_a == log_b and len(log_a) >= 6
    assert weights_a.keys() == weights_b.keys()
    assert [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])] == []
