"""peftlab.lab.graphs: the nodes a backward runs, each once."""

from __future__ import annotations

import torch
from torch import nn

from peftlab.lab.graphs import node_counts, step_graph


def test_node_counts_counts_each_node_once():
    """y = (a·b) + (a·b).exp(): the product's node is reached on two paths and counted once; the leaf's
    AccumulateGrad once per leaf that requires a gradient."""
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    ab = a * b
    counts = node_counts((ab + ab.exp()).sum())
    assert counts == {"SumBackward0": 1, "AddBackward0": 1, "ExpBackward0": 1, "MulBackward0": 1,
                      "AccumulateGrad": 2}
    assert node_counts(torch.ones(2)) == {}  # no graph


def test_step_graph_returns_the_nodes_and_the_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 4)
    counts, grads = step_graph(model, x)
    assert counts["AccumulateGrad"] == 3 and counts["LogsumexpBackward0"] == 1
    loss = model(x).logsumexp(-1).mean()
    want = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert len(grads) == 3
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w)
