"""Linear parts chosen at load: product formulations, head layouts, per-row int8, the measured choice."""
import json

import pytest
import torch
import torch.nn as nn

import omni.tuning as tuning
from omni.machine import has_vnni
from omni.linear import BLOCK_ROWS, DenseHead, Int8Linear, Products
from omni.tuning import Overrides, available_formulations, batch_invariant, choose_products, tune_products
from omni.tokens import PADDED_VOCAB


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("block", [None, 1, *BLOCK_ROWS])
@pytest.mark.parametrize("formulation", ["linear", "wxt", "onednn"])
def test_formulations_compute_the_same_product(formulation, block, rows):
    if formulation not in available_formulations():
        pytest.skip(f"this torch build has no {formulation}")
    plan = Products(formulation, block)
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 32), torch.randn(48), torch.randn(rows, 32)
    out = plan(x, w, b)
    torch.testing.assert_close(out, nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous() and out.shape == (rows, 48)
    assert plan(x.view(1, rows, 32), w).shape == (1, rows, 48)


@pytest.mark.parametrize("layout", ["parts", "full"])
def test_head_layouts_give_each_row_its_part(layout):
    torch.manual_seed(1)
    weight = torch.randn(PADDED_VOCAB, 8)
    head = DenseHead(nn.Parameter(weight), Products("wxt", 2, head=layout))
    x = torch.randn(2, 8)
    audio, text = head.rows(x, ("audio", "text"))
    full = x @ weight.T
    torch.testing.assert_close(audio, full[0, 152000:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, full[1, :152000], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_rows_are_quantized_one_by_one(reduce_range):
    torch.manual_seed(2)
    w, b = torch.randn(64, 48), torch.randn(64)
    layer = Int8Linear(w, b, reduce_range)
    x = torch.randn(3, 48) * torch.tensor([[1.0], [100.0], [0.01]])  # very different row ranges
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone)
    if not reduce_range and not has_vnni():
        return  # without VNNI fbgemm's int16 sums saturate at full range: the engine reduces it there
    ref = nn.functional.linear(x, w, b)
    error = (together - ref).norm(dim=1) / ref.norm(dim=1)
    assert error.max() < (0.05 if reduce_range else 0.03), error


def fake_times(table: dict):
    """A stand-in for `measure_products` answering from `table` {plan: {rows: seconds}}."""
    return lambda weights, plans, rows: {c: {n: table[c][n] for n in rows} for c in plans}


def test_the_choice_is_batch_invariant_and_no_slower_for_one_request(monkeypatch):
    official = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 32: 1.0}
    slow_alone = {1: 2.0, 2: 1.0, 4: 1.0, 8: 1.0, 32: 1.0}
    table = {("linear", None): official, ("linear", 1): {1: 1.0, 2: 1.5, 4: 3.0, 8: 6.0, 32: 24.0},
             **{c: slow_alone for c in [("linear", b) for b in BLOCK_ROWS] + [("onednn", b) for b in BLOCK_ROWS]},
             **{("wxt", b): {1: 1.0, 2: 0.5, 4: 0.9 if b == 4 else 2.0, 8: 1.0, 32: 1.0} for b in BLOCK_ROWS}}
    monkeypatch.setattr(tuning, "measure_products", fake_times(table))
    monkeypatch.setattr(tuning, "batch_invariant", lambda c, w: True)
    assert choose_products([torch.randn(4, 4)], ("linear", "wxt", "onednn")) == Products("wxt", 4)
    monkeypatch.setattr(tuning, "batch_invariant", lambda c, w: c[0] != "wxt")  # wxt's sums move on this machine
    # nothing keeps up at both 1 and 2 rows: one row at a time, which is the official call at 1 row
    assert choose_products([torch.randn(4, 4)], ("linear", "wxt", "onednn")) == Products("linear", 1)
    monkeypatch.setattr(tuning, "batch_invariant", lambda c, w: False)
    assert choose_products([torch.randn(4, 4)], ("linear",)) == Products("linear", 1)


def test_a_plan_much_faster_at_two_rows_is_not_kept_if_slower_at_one(monkeypatch):
    """The sum over row counts must not hide one request's slowdown (as on the 896x4864 down projection)."""
    table = {("linear", None): {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 32: 1.0},
             ("linear", 1): {1: 1.0, 2: 1.02, 4: 2.0, 8: 4.0, 32: 16.0},
             ("wxt", 4): {1: 1.39, 2: 0.6, 4: 0.4, 8: 0.6, 32: 1.2}}
    monkeypatch.setattr(tuning, "candidates", lambda formulations: [("wxt", 4)])
    monkeypatch.setattr(tuning, "measure_products", fake_times(table))
    monkeypatch.setattr(tuning, "batch_invariant", lambda c, w: True)
    assert choose_products([torch.randn(4, 4)], ("wxt",)) == Products("linear", 1)


@pytest.mark.parametrize("formulation", ["linear", "wxt", "onednn"])
def test_the_invariance_check_sees_a_row_count_dependent_product(formulation):
    """All rows in one product (block None) is what BLAS makes batch dependent; 1-row blocks never are."""
    if formulation not in available_formulations():
        pytest.skip(f"this torch build has no {formulation}")
    weight = torch.randn(256, 512)
    assert not batch_invariant((formulation, None), weight)
    assert batch_invariant((formulation, 1), weight) or formulation == "wxt"


def test_the_choice_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_OMNI_CACHE", str(tmp_path))
    monkeypatch.delenv("MINI_OMNI_PRODUCTS", raising=False)
    groups = {"16x8": [torch.randn(16, 8) for _ in range(3)], "head": [torch.randn(64, 8)]}
    first = tune_products(groups, Overrides.from_env())
    assert set(first) == set(groups)
    assert len(json.loads((tmp_path / "products.json").read_text())) == 1

    def no_measuring(weights, plans, rows):
        raise AssertionError("measured again")

    monkeypatch.setattr(tuning, "measure_products", no_measuring)
    assert tune_products(groups, Overrides.from_env()) == first


def test_a_formulation_can_be_forced(monkeypatch):
    monkeypatch.setenv("MINI_OMNI_PRODUCTS", "wxt")
    assert tune_products({"a": [torch.randn(4, 4)]}, Overrides.from_env())["a"].formulation == "wxt"
    monkeypatch.setenv("MINI_OMNI_PRODUCTS", "blas")
    with pytest.raises(ValueError, match="MINI_OMNI_PRODUCTS"):
        tune_products({"a": [torch.randn(4, 4)]}, Overrides.from_env())


def test_int8_forward_is_the_per_row_formula():
    """The lean forward computes exactly: rows at unit max-abs plus a [+1, -1] anchor row through fbgemm,
    rows scaled back, bias added."""
    torch.manual_seed(3)
    w, b = torch.randn(40, 24), torch.randn(40)
    layer = Int8Linear(w, b, reduce_range=False)
    x = torch.randn(5, 24) * 3
    amax = x.abs().amax(dim=-1, keepdim=True)
    anchor = torch.zeros(1, 24)
    anchor[0, :2] = torch.tensor([1.0, -1.0])
    expected = torch.ops.quantized.linear_dynamic(torch.cat([x / amax, anchor]), layer._packed, False)[:-1] * amax + b
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x.view(1, 5, 24)), expected.view(1, 5, 40))
