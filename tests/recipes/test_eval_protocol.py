"""The evaluation loop is MTT's ``evaluate_synset``, pinned against a naive re-creation of it.

The reference below is written from MTT's loop (docs/algorithm.md, "Evaluation protocols"):
``for ep in range(E + 1)``, a whole pass over a shuffled set per epoch, and after the epoch of
index ``E // 2 + 1`` the lr is multiplied by 0.1 by building a new SGD optimiser, which throws
the momentum away. Its randomness (network init, each epoch's shuffle, each batch's DSA draw) is
injected from the streams dpd seeds with the network's seed, so the two must agree bit for bit.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from dpd_cli.artifacts import evaluation
from dpd_cli.config.settings import resolve
from dpd_cli.core.augment import dsa
from dpd_cli.models import build_model
from dpd_cli.recipes import evaluate as E
from tests.helpers import tiny_spec


def _blobs(n: int = 12, side: int = 8, n_classes: int = 3):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n_classes).repeat(n // n_classes)
    x = torch.randn(n, 1, side, side, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def _reference_evaluate_synset(
    spec, images, labels, epoch_eval_train, lr_net, batch_train, seed, augment=True, momentum=0.9, weight_decay=0.0005
):
    torch.manual_seed(seed)
    net = build_model(spec)
    shuffles = torch.Generator().manual_seed(seed)  # injected: dpd's shuffle stream
    dsa_seeds = random.Random(seed)  # injected: dpd's per-batch DSA seeds
    lr = float(lr_net)
    Epoch = int(epoch_eval_train)
    lr_schedule = [Epoch // 2 + 1]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for ep in range(Epoch + 1):
        net.train()
        perm = torch.randperm(len(images), generator=shuffles)
        total = 0.0
        for start in range(0, len(images), batch_train):
            idx = perm[start : start + batch_train]
            img = dsa(images[idx], dsa_seeds.getrandbits(63)) if augment else images[idx]
            loss = F.cross_entropy(net(img), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total)
        if ep in lr_schedule:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return net, losses


@pytest.mark.parametrize("epochs", [1, 2, 5, 6])
@pytest.mark.parametrize("augment", [True, False])
def test_training_loop_is_mtts_evaluate_synset(epochs, augment):
    # 12 images in batches of 5 (5, 5, 2): several optimiser steps per epoch, so the shuffle,
    # the per-batch DSA draws, the decay point and the momentum restart all show in the weights.
    x, y = _blobs()
    s = resolve("evaluate", {"batch": 5, "dsa": augment, "threads": 1})
    seen = []
    net, diverged = E._train(
        tiny_spec(),
        [x],
        [y],
        epochs,
        [0.05],
        s,
        [7],
        torch.device("cpu"),
        lambda ep, loss: seen.append((ep, float(loss))),
    )
    ref, ref_losses = _reference_evaluate_synset(tiny_spec(), x, y, epochs, 0.05, 5, 7, augment)
    assert diverged == [None]
    assert [ep for ep, _ in seen] == list(range(1, epochs + 2))  # E + 1 epochs, reported 1-based
    torch.testing.assert_close([loss for _, loss in seen], ref_losses, rtol=1e-6, atol=0)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_train_and_test_tests_the_trained_network():
    x, y = _blobs()
    s = resolve("evaluate", {"batch": 5, "threads": 1})
    ((acc, _, _),) = E._train_and_test(
        tiny_spec(), [x], [y], x[:6], y[:6], 5, [0.05], s, [3], torch.device("cpu"), lambda *a: None
    )
    ref, _ = _reference_evaluate_synset(tiny_spec(), x, y, 5, 0.05, 5, 3)
    with torch.no_grad():
        ref.eval()
        expected = int((ref(x[:6]).argmax(1) == y[:6]).sum()) / 6
    assert acc == expected


@pytest.mark.parametrize(
    "epochs, run, before_drop", [(1, 2, 2), (2, 3, 3), (5, 6, 4), (300, 301, 152), (1000, 1001, 502)]
)
def test_epochs_run(epochs, run, before_drop):
    assert E.epochs_run(epochs) == (run, before_drop)


def test_a_partial_result_of_an_older_loop_is_not_reused(tmp_path, monkeypatch):
    # A training finished by dpd 0.1.0's loop (protocol version 1) must be redone, not reused.
    s = resolve("evaluate", {"epochs": 3, "runs": 1, "threads": 1})
    job = ("distilled", "convnet", 0)
    outcome = {"source": job[0], "model": job[1], "run": job[2], "accuracy": 0.123}
    new_key = E._job_key(s, "abc", *job)
    monkeypatch.setattr(E, "PROTOCOL_VERSION", 1)
    old_key = E._job_key(s, "abc", *job)
    monkeypatch.undo()
    assert old_key != new_key
    partial = tmp_path / "eval.partial.jsonl"
    partial.write_text(json.dumps({"key": old_key, "outcome": outcome}) + "\n")
    assert evaluation.read_partial(partial, {new_key: job}) == {}
    partial.write_text(json.dumps({"key": new_key, "outcome": outcome}) + "\n")
    assert evaluation.read_partial(partial, {new_key: job}) == {job: outcome}
