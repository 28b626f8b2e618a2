"""``peftlab.merging`` on tensors and on full-model state dicts.

* properties (hypothesis, small shapes): DARE at density 1 is task arithmetic, magnitude pruning at
  density 1 is the weighted sum, the trim keeps exactly k = int(density·n) entries and they are the
  largest, the elected sign is the majority under "total" and "frequency", the disjoint merge is the
  mean over the agreeing entries;
* conformance with peft's ``merge_utils`` (the oracle) for every function, DARE under the same RNG state;
* task vectors of state dicts: round trips, negation, averaging, TIES over the whole model, errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab import merging
from peftlab.merging import (calculate_majority_sign_mask, dare_linear, dare_ties, disjoint_merge,
                             magnitude_based_pruning, magnitude_prune, prune, random_pruning, task_arithmetic, ties)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tasks(draw, max_tasks: int = 4):
    """(task tensors, weights): 1–4 tasks of one small shape; values rounded to one decimal so zeros,
    equal magnitudes and sign conflicts occur."""
    n = draw(st.integers(1, max_tasks))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ts = [torch.round(torch.randn(shape, generator=g, dtype=torch.float64) * 10) / 10 for _ in range(n)]
    weights = draw(st.lists(st.floats(-2, 2, allow_nan=False).map(lambda x: round(x, 2)), min_size=n, max_size=n))
    return ts, weights


densities = st.floats(0.05, 1.0).map(lambda x: round(x, 3))


# ---------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(tasks())
def test_density_one_dare_is_task_arithmetic(data):
    ts, w = data
    expected = task_arithmetic(ts, w)
    assert torch.equal(dare_linear(ts, w, density=1.0), expected)
    assert torch.equal(magnitude_prune(ts, w, density=1.0), expected)
    assert torch.equal(dare_ties(ts, w, density=1.0), ties(ts, w, density=1.0))


@SETTINGS
@given(tasks())
def test_task_arithmetic_is_the_weighted_sum(data):
    ts, w = data
    expected = sum(wi * t for wi, t in zip(w, ts))
    torch.testing.assert_close(task_arithmetic(ts, w), expected)


@SETTINGS
@given(tasks(max_tasks=1), densities)
def test_trim_keeps_exactly_the_top_k(data, density):
    (t,), _ = data
    trimmed = magnitude_based_pruning(t, density)
    k = int(density * t.numel())
    kept = trimmed != 0
    n_kept_positions = min(k, int((t != 0).sum()))  # a kept zero stays zero
    assert int(kept.sum()) == n_kept_positions
    assert torch.equal(trimmed[kept], t[kept])  # kept entries unchanged
    if kept.any() and (~kept).any():
        assert t[kept].abs().min() >= t[~kept].abs().max()  # the kept are the largest
    # TIES trims each task on its own: the fraction kept per task is the same k
    ts = [t, -2 * t]
    stacked = torch.stack([prune(x, density, "magnitude") for x in ts])
    assert [int((s != 0).sum()) for s in stacked] == [n_kept_positions] * 2


@SETTINGS
@given(tasks())
def test_elected_sign_is_the_majority(data):
    ts, _ = data
    T = torch.stack(ts)
    for method in ("total", "frequency"):
        mask = calculate_majority_sign_mask(T, method)
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in T.shape[1:]]).reshape(-1, T.dim() - 1):
            column = T[(slice(None), *idx.tolist())]
            if method == "total":
                score = float(column.sum())  # the sign of the total mass
            else:
                score = float((column > 0).sum() - (column < 0).sum())  # the sign most tasks have
            elected = 1.0 if score >= 0 else -1.0
            agree = [(float(v) > 0 and elected > 0) or (float(v) < 0 and elected < 0) for v in column]
            assert mask[(slice(None), *idx.tolist())].tolist() == agree


@SETTINGS
@given(tasks(), densities)
def test_ties_is_the_disjoint_mean_of_agreeing_entries(data, density):
    ts, w = data
    merged = ties(ts, w, density)
    trimmed = torch.stack([prune(t, density, "magnitude") for t in ts])
    mask = calculate_majority_sign_mask(trimmed, "total")
    weighted = trimmed * torch.tensor(w, dtype=trimmed.dtype).view(-1, *[1] * (trimmed.dim() - 1))
    count = mask.sum(0)
    expected = torch.where(count > 0, (weighted * mask).sum(0) / count.clamp(min=1), torch.zeros_like(merged))
    torch.testing.assert_close(merged, expected)


@SETTINGS
@given(tasks(), densities, st.integers(0, 1000))
def test_dare_keeps_entries_rescaled_and_seeded(data, density, seed):
    ts, w = data
    t = ts[0]
    g = torch.Generator().manual_seed(seed)
    out = random_pruning(t, density, rescale=True, generator=g)
    kept = out != 0
    torch.testing.assert_close(out[kept], t[kept] / density)  # survivors rescaled by 1/density
    again = random_pruning(t, density, rescale=True, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)
    a = dare_linear(ts, w, density, generator=torch.Generator().manual_seed(seed))
    b = dare_linear(ts, w, density, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


def test_dare_is_unbiased_and_drop_only_is_not():
    t = torch.ones(200_000, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    rescaled = random_pruning(t, 0.1, rescale=True, generator=g)
    dropped = random_pruning(t, 0.1, rescale=False, generator=g)
    assert abs(rescaled.mean().item() - 1.0) < 0.03  # E[m ⊙ δ / density] = δ
    assert abs(dropped.mean().item() - 0.1) < 0.01  # DropOnly shrinks the delta to density · δ
    assert abs(int((rescaled != 0).sum()) / t.numel() - 0.1) < 0.005


def test_ties_on_the_five_parameter_example():
    # three task vectors over five parameters: trim 60 %, elect by total mass, average the agreeing
    ts = [torch.tensor([0.8, -0.1, 0.5, 0.0, -0.9]),
          torch.tensor([0.6, 0.2, -0.7, 0.1, -0.8]),
          torch.tensor([-0.3, 0.05, 0.6, -0.9, 0.1])]
    merged = ties(ts, [1.0, 1.0, 1.0], density=0.6)
    # trimmed: [0.8,0,0.5,0,-0.9], [0.6,0,-0.7,0,-0.8], [-0.3,0,0.6,-0.9,0]
    expected = torch.tensor([(0.8 + 0.6) / 2, 0.0, (0.5 + 0.6) / 2, -0.9, (-0.9 - 0.8) / 2])
    torch.testing.assert_close(merged, expected)


# ---------------------------------------------------------------------------------------------------
# conformance with peft's merge_utils
# ---------------------------------------------------------------------------------------------------
peft_mu = pytest.importorskip("peft.utils.merge_utils")


@pytest.mark.peer
@SETTINGS
@given(tasks(), densities, st.sampled_from(["total", "frequency"]), st.integers(0, 10_000))
def test_equal_to_peft_merge_utils(data, density, sign_method, seed):
    ts, w = data
    ts = [t.float() for t in ts]
    wt = torch.tensor(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns at density 1
        assert torch.equal(task_arithmetic(ts, wt), peft_mu.task_arithmetic(ts, wt))
        assert torch.equal(magnitude_prune(ts, wt, density), peft_mu.magnitude_prune(ts, wt, density))
        assert torch.equal(ties(ts, wt, density, sign_method), peft_mu.ties(ts, wt, density, sign_method))
        for ours, theirs, extra in ((dare_linear, peft_mu.dare_linear, ()),
                                    (dare_ties, peft_mu.dare_ties, (sign_method,))):
            torch.manual_seed(seed)
            a = ours(ts, wt, density, *extra)
            torch.manual_seed(seed)
            b = theirs(ts, wt, density, *extra)
            assert torch.equal(a, b)
        T = torch.stack(ts)
        assert torch.equal(calculate_majority_sign_mask(T, sign_method),
                           peft_mu.calculate_majority_sign_mask(T, sign_method))
        mask = calculate_majority_sign_mask(T, sign_method)
        assert torch.equal(disjoint_merge(T, mask), peft_mu.disjoint_merge(T, mask))
        assert torch.equal(prune(ts[0], density, "magnitude"), peft_mu.prune(ts[0], density, "magnitude"))
        torch.manual_seed(seed)
        a = prune(ts[0], density, "random", rescale=True)
        torch.manual_seed(seed)
        assert torch.equal(a, peft_mu.prune(ts[0], density, "random", rescale=True))


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_tensor_errors_say_what_is_valid():
    ts = [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        ties(ts, [1, 1], density=0.0)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        dare_linear(ts, [1, 1], density=1.5)
    with pytest.raises(ValueError, match="needs density"):
        ties(ts, [1, 1], density=None)
    with pytest.raises(ValueError, match="valid methods: 'total', 'frequency'"):
        ties(ts, [1, 1], density=0.5, majority_sign_method="mass")
    with pytest.raises(ValueError, match="one shape"):
        task_arithmetic([torch.ones(3), torch.ones(4)], [1, 1])
    with pytest.raises(ValueError, match="one weight per task"):
        task_arithmetic(ts, [1.0])
    with pytest.raises(ValueError, match="no task tensors"):
        task_arithmetic([], [])
    with pytest.raises(ValueError, match="valid methods: 'magnitude', 'random'"):
        prune(ts[0], 0.5, "largest")
    with pytest.raises(ValueError, match="valid methods: task_arithmetic"):
        merging.merge_tensors(ts, [1, 1], method="average")


# ---------------------------------------------------------------------------------------------------
# state dicts of full models
# ---------------------------------------------------------------------------------------------------
def _state_dicts(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = {"lin.weight": torch.randn(6, 5, generator=g), "lin.bias": torch.randn(6, generator=g),
           "head.weight": torch.randn(2, 6, generator=g), "pos_ids": torch.arange(4)}
    fts = []
    for _ in range(n):
        fts.append({k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
                    for k, v in pre.items()})
    return pre, fts


def test_task_vector_round_trip_and_negation():
    pre, (ft, *_) = _state_dicts()
    delta = merging.task_vector(ft, pre)
    assert "pos_ids" not in delta  # integer buffers are not part of a task vector
    back = merging.apply_task_vector(pre, delta, 1.0)
    for k in pre:
        torch.testing.assert_close(back[k], ft[k])
    negated = merging.apply_task_vector(pre, delta, -1.0)
    torch.testing.assert_close(negated["lin.weight"], 2 * pre["lin.weight"] - ft["lin.weight"])
    assert torch.equal(negated["pos_ids"], pre["pos_ids"])


def test_merge_state_dicts_methods():
    pre, fts = _state_dicts()
    avg = merging.merge_state_dicts(pre, fts, weights=[1 / 3] * 3)
    torch.testing.assert_close(avg["lin.weight"], sum(f["lin.weight"] for f in fts) / 3)
    ta = merging.merge_state_dicts(pre, fts, method="task_arithmetic", scaling=0.4)
    torch.testing.assert_close(ta["lin.weight"],
                               pre["lin.weight"] + 0.4 * sum(f["lin.weight"] - pre["lin.weight"] for f in fts))
    # density 1: DARE equals task arithmetic, on whole models too
    dare = merging.merge_state_dicts(pre, fts, method="dare_linear", density=1.0, scaling=0.4, seed=3)
    for k in pre:
        torch.testing.assert_close(dare[k], ta[k])
    # the same seed gives the same masks; DARE at 0.5 changes things
    d1 = merging.merge_state_dicts(pre, fts, method="dare_ties", density=0.5, seed=1)
    d2 = merging.merge_state_dicts(pre, fts, method="dare_ties", density=0.5, seed=1)
    assert all(torch.equal(d1[k], d2[k]) for k in pre)
    # exclude keeps the pretrained value
    ex = merging.merge_state_dicts(pre, fts, exclude=[r"^head\."])
    assert torch.equal(ex["head.weight"], pre["head.weight"])


def test_ties_scope_model_trims_over_the_whole_model():
    pre, fts = _state_dicts(n=2)
    deltas = [merging.task_vector(f, pre) for f in fts]
    merged = merging.merge_task_vectors(deltas, [1.0, 1.0], method="magnitude_prune", density=0.2, scope="model")
    total = sum(v.numel() for v in deltas[0].values())
    flat = torch.cat([d.reshape(-1) for d in deltas[0].values()])
    only_first = merging.merge_task_vectors([deltas[0]], [1.0], method="magnitude_prune", density=0.2,
                                            scope="model")
    assert sum(int((v != 0).sum()) for v in only_first.values()) == int(0.2 * total)
    threshold = flat.abs().topk(int(0.2 * total)).values.min()
    assert all((v[v != 0].abs() >= threshold).all() for v in only_first.values())
    per_tensor = merging.merge_task_vectors([deltas[0]], [1.0], method="magnitude_prune", density=0.2)
    assert sum(int((v != 0).sum()) for v in per_tensor.values()) == sum(int(0.2 * v.numel())
                                                                         for v in deltas[0].values())
    assert set(merged) == set(deltas[0])


def test_state_dict_errors():
    pre, fts = _state_dicts(n=2)
    bad = dict(fts[1])
    bad.pop("lin.bias")
    with pytest.raises(ValueError, match="do not hold the same tensors"):
        merging.merge_state_dicts(pre, [fts[0], bad])
    wrong = dict(fts[1], **{"lin.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="differ in shape"):
        merging.merge_state_dicts(pre, [fts[0], wrong])
    with pytest.raises(ValueError, match="one weight per task"):
        merging.merge_state_dicts(pre, fts, weights=[1.0])
    with pytest.raises(ValueError, match="needs density"):
        merging.merge_state_dicts(pre, fts, method="ties")
    with pytest.raises(ValueError, match="valid methods"):
        merging.merge_state_dicts(pre, fts, method="svd")
