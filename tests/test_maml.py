"""MAML inner loop: pure over parameter dicts, sharded gradients equal single-device ones, order options."""

import numpy as np
import pytest
import torch

from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.maml import (
    adapt_head_on_pixels,
    balanced_weights,
    head_params,
    head_pixel_logits,
    inner_loop,
    pixel_support,
    run,
    sgd_update,
)
from napari_metahistoseg.models import PixelHead


def _problem(seed=0, n=400, f=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    return x, y


def test_sgd_update_is_pure():
    p = {"a": torch.ones(2), "b": torch.zeros(1)}
    out = sgd_update(p, {"a": torch.ones(2)}, 0.5)
    assert torch.equal(p["a"], torch.ones(2)) and out["a"].tolist() == [0.5, 0.5] and out["b"] is p["b"]
    out2 = sgd_update(p, {"a": torch.ones(2)}, 0.5, lrs={"a": torch.tensor(2.0)})
    assert out2["a"].tolist() == [-1.0, -1.0]


def test_inner_loop_never_mutates_inputs_and_reduces_loss():
    torch.manual_seed(0)
    head = PixelHead(8, 2, 16)
    before = {k: v.detach().clone() for k, v in head.state_dict().items()}
    init = head_params(head)
    init_copy = {k: v.detach().clone() for k, v in init.items()}
    x, y = _problem()
    gen = adapt_head_on_pixels(head, init, x, y, n_classes=2, steps=30, lr=0.5)
    losses = []
    while True:
        try:
            losses.append(next(gen)["loss"])
        except StopIteration as s:
            fast = s.value
            break
    assert losses[-1] < losses[0] * 0.7
    for k in init:
        assert torch.equal(init[k], init_copy[k]), "caller's dict was mutated"
        assert not torch.equal(fast[k], init[k])
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), "model was mutated"
    acc = (head_pixel_logits(head, fast, x).argmax(1) == y).float().mean()
    assert acc > 0.9


def test_two_device_shards_equal_one_device():
    torch.manual_seed(1)
    head = PixelHead(8, 3, 0)
    init = head_params(head)
    x, _ = _problem(2)
    y = torch.randint(0, 3, (400,))
    one = run(adapt_head_on_pixels(head, init, x, y, n_classes=3, steps=4, lr=0.3, devices=["cpu"]))
    two = run(adapt_head_on_pixels(head, init, x, y, n_classes=3, steps=4, lr=0.3, devices=["cpu", "cpu"]))
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=1e-5)


def test_second_order_keeps_graph_first_order_does_not():
    torch.manual_seed(2)
    head = PixelHead(8, 2, 8)
    x, y = _problem(3)
    x.requires_grad_(True)
    init = head_params(head)
    grads = {}
    for fo in (True, False):
        fast = run(adapt_head_on_pixels(head, init, x, y, n_classes=2, steps=2, lr=0.5, first_order=fo))
        loss = head_pixel_logits(head, fast, x).logsumexp(1).mean()
        grads[fo] = torch.autograd.grad(loss, init["net.0.weight"])[0]
    assert not torch.allclose(grads[True], grads[False])  # second-order terms change the meta-gradient


def test_learned_per_tensor_lrs_used():
    head = PixelHead(8, 2, 0)
    init = head_params(head)
    x, y = _problem(4)
    zero = {k: torch.tensor(0.0) for k in init}
    fast = run(adapt_head_on_pixels(head, init, x, y, n_classes=2, steps=3, lr=1.0, lrs=zero))
    for k in init:
        assert torch.equal(fast[k], init[k])


def test_pixel_support_stratified_and_sparse():
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    lab = torch.full((2, 4, 4), IGNORE)
    lab[0, 0, :] = 0
    lab[1, 3, :2] = 1
    x, y = pixel_support(feats, lab, 2, max_pixels=100)
    assert x.shape == (6, 3) and sorted(y.tolist()) == [0, 0, 0, 0, 1, 1]
    x, y = pixel_support(feats, lab, 2, max_pixels=2)
    assert sorted(y.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="no labelled pixels"):
        pixel_support(feats, torch.full((2, 4, 4), IGNORE), 2, max_pixels=10)
    with pytest.raises(ValueError, match="class ids"):
        pixel_support(feats, torch.full((2, 4, 4), 5), 2, max_pixels=10)


def test_pixel_support_uniform_keeps_the_class_prior():
    feats = torch.rand(1, 3, 100, 100)
    lab = torch.zeros(1, 100, 100, dtype=torch.long)
    lab[0, :20] = 1  # 20 % foreground
    lab[0, 90:] = IGNORE
    x, y = pixel_support(feats, lab, 2, max_pixels=3000, seed=1, stratified=False)
    assert x.shape == (3000, 3) and abs(float((y == 1).float().mean()) - 2 / 9) < 0.03
    x, y = pixel_support(feats, lab, 2, max_pixels=3000, seed=1, stratified=True)
    assert int((y == 1).sum()) == 1500  # stratified: half per class
    x, y = pixel_support(feats, lab, 2, max_pixels=10**6, stratified=False)
    assert len(y) == 9000 and not (y == IGNORE).any()  # every labelled pixel, no unknown one


def test_support_balance_auto():
    from napari_metahistoseg.config import MAMLConfig
    from napari_metahistoseg.pipeline import support_balance

    dense = np.zeros((10, 10), np.uint8)
    sparse = np.full((10, 10), IGNORE, np.uint8)
    sparse[0, :5] = 1
    assert support_balance(MAMLConfig(), [dense], 2) is False  # fully painted: keep the class prior
    assert support_balance(MAMLConfig(), [dense], 3) is True  # multi-class: keep rare classes visible
    assert support_balance(MAMLConfig(), [sparse], 2) is True  # strokes: balance the classes
    assert support_balance(MAMLConfig(), [dense, sparse], 2) is False  # 105 of 200 pixels labelled
    assert support_balance(MAMLConfig(dense_label_fraction=0.6), [dense, sparse], 2) is True
    assert support_balance(MAMLConfig(class_balance=True), [dense], 2) is True
    assert support_balance(MAMLConfig(class_balance=False), [sparse], 5) is False
    with pytest.raises(ValueError, match="class_balance"):
        MAMLConfig(class_balance="yes")
    with pytest.raises(ValueError, match="dense_label_fraction"):
        MAMLConfig(dense_label_fraction=1.5)


def test_balanced_weights():
    w = balanced_weights(torch.tensor([0, 0, 0, 1]), 3, True)
    assert w[2] == 0 and w[1] == 3 * w[0]
    assert balanced_weights(torch.tensor([0, 1]), 2, False).tolist() == [1.0, 1.0]


def test_inner_loop_validates():
    with pytest.raises(ValueError):
        run(inner_loop([], {"a": torch.ones(1)}, ["a"], steps=1, lr=0.1))
    with pytest.raises(ValueError, match="not found"):
        run(inner_loop([lambda p: p["a"].sum()], {"a": torch.ones(1)}, ["b"], steps=1, lr=0.1))


def test_run_and_relay_drive_progress_generators():
    from napari_metahistoseg.maml import relay, run

    closed = []

    def work(n):
        try:
            for i in range(n):
                yield {"step": i}
            return "done"
        finally:
            closed.append(n)

    seen = []
    assert run(work(3), seen.append) == "done" and [p["step"] for p in seen] == [0, 1, 2]

    def outer():
        return (yield from relay(work(5), lambda p: {**p, "stage": "x"}))

    assert run(outer()) == "done"
    g = outer()
    assert next(g) == {"step": 0, "stage": "x"}
    g.close()  # a cancelled job: the inner generator is closed at once, not at garbage collection
    assert closed == [3, 5, 5]
