"""Linear parts chosen at load: product formulations, head layouts, per-row int8, the measured choice."""
import json

import pytest
import torch
import torch.nn as nn

import omni.linear as linear
from omni.linear import DenseHead, Int8Linear, Products, choose_products, tune_products
from omni.tokens import PADDED_VOCAB


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("plan", [Products(("linear", "linear")), Products(("wxt", "wxt"))])
def test_formulations_compute_the_same_product(plan, rows):
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
    ref = nn.functional.linear(x, w, b)
    error = (together - ref).norm(dim=1) / ref.norm(dim=1)
    assert error.max() < (0.05 if reduce_range else 0.03), error


def test_ties_keep_the_official_formulation():
    times = {"linear": {1: 1.0, 2: 1.0}, "wxt": {1: 0.99, 2: 0.5}}
    plan = choose_products(times)
    assert plan.by_rows == ("linear", "wxt")
    assert plan.head == "full"  # both rows at once stream faster than one row at a time
    assert choose_products({"linear": {1: 0.3, 2: 1.0}, "wxt": {1: 0.4, 2: 0.9}}).head == "parts"


def test_the_choice_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_OMNI_CACHE", str(tmp_path))
    monkeypatch.delenv("MINI_OMNI_PRODUCTS", raising=False)
    groups = {"16x8": [torch.randn(16, 8) for _ in range(3)], "head": [torch.randn(64, 8)]}
    first = tune_products(groups)
    assert set(first) == set(groups)
    assert len(json.loads((tmp_path / "products.json").read_text())) == 1

    def no_measuring(weights):
        raise AssertionError("measured again")

    monkeypatch.setattr(linear, "measure_products", no_measuring)
    assert tune_products(groups) == first


def test_a_formulation_can_be_forced(monkeypatch):
    monkeypatch.setenv("MINI_OMNI_PRODUCTS", "wxt")
    assert tune_products({"a": [torch.randn(4, 4)]})["a"].by_rows == ("wxt", "wxt")
    monkeypatch.setenv("MINI_OMNI_PRODUCTS", "blas")
    with pytest.raises(ValueError, match="MINI_OMNI_PRODUCTS"):
        tune_products({"a": [torch.randn(4, 4)]})
