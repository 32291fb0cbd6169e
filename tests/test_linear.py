"""Linear parts chosen at load: product formulations, head layouts, per-row int8, the measured choice."""
import json

import pytest
import torch
import torch.nn as nn

import omni.tuning as tuning
from omni.machine import has_vnni
from omni.linear import TUNED_ROWS, DenseHead, Int8Linear, Products
from omni.tuning import Overrides, available_formulations, choose_products, tune_products
from omni.tokens import PADDED_VOCAB


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("formulation", ["linear", "wxt", "onednn"])
def test_formulations_compute_the_same_product(formulation, rows):
    if formulation not in available_formulations():
        pytest.skip(f"this torch build has no {formulation}")
    plan = Products((formulation,) * len(TUNED_ROWS))
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
    head = DenseHead(nn.Parameter(weight), Products(("wxt", "wxt"), head=layout))
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


def test_ties_keep_the_official_formulation():
    times = {"linear": {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 32: 1.0}, "wxt": {1: 0.99, 2: 0.5, 4: 1.2, 8: 1.5, 32: 2},
             "onednn": {1: 1.0, 2: 0.9, 4: 0.6, 8: 0.7, 32: 0.99}}
    plan = choose_products(times)
    assert plan.by_rows == ("linear", "wxt", "onednn", "onednn", "linear")
    assert plan.head == "full"  # both rows at once stream faster than one row at a time
    slow_two = {"linear": {1: 0.3, 2: 1.0, 4: 1, 8: 1, 32: 1}, "wxt": {1: 0.4, 2: 0.9, 4: 1, 8: 1, 32: 1}}
    assert choose_products(slow_two).head == "parts"


def test_row_counts_use_the_plan_of_the_next_measured_count():
    plan = Products(("wxt", "linear", "onednn", "wxt", "onednn"))
    assert [plan.formulation(n) for n in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [
        "wxt", "linear", "onednn", "onednn", "wxt", "wxt", "onednn", "onednn", "linear"]


def test_a_prefill_chunk_is_a_measured_row_count():
    from omni.generate import PREFILL_CHUNK

    assert PREFILL_CHUNK in TUNED_ROWS


def test_the_choice_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_OMNI_CACHE", str(tmp_path))
    monkeypatch.delenv("MINI_OMNI_PRODUCTS", raising=False)
    groups = {"16x8": [torch.randn(16, 8) for _ in range(3)], "head": [torch.randn(64, 8)]}
    first = tune_products(groups, Overrides.from_env())
    assert set(first) == set(groups)
    assert len(json.loads((tmp_path / "products.json").read_text())) == 1

    def no_measuring(weights):
        raise AssertionError("measured again")

    monkeypatch.setattr(tuning, "measure_products", no_measuring)
    assert tune_products(groups, Overrides.from_env()) == first


def test_a_formulation_can_be_forced(monkeypatch):
    monkeypatch.setenv("MINI_OMNI_PRODUCTS", "wxt")
    assert tune_products({"a": [torch.randn(4, 4)]}, Overrides.from_env())["a"].by_rows == ("wxt",) * len(TUNED_ROWS)
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
