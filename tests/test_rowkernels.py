"""The project's own few-row kernels: q8rows (int8, AVX512-VNNI) gives exact per-row integer sums,
f32rows (fp32, AVX-512) fixed-order sums; each keeps one table for head and embedding; each is chosen
by measurement with a fallback."""
import pytest
import torch
import torch.nn as nn

from omni import linear, rowkernels, runtime, tuning
from omni.linear import HEAD_PARTS, Int8Embedding, int8_rows
from omni.rowkernels import F32Table, Q8Table, RowsHead, RowsLinear
from omni.tokens import PADDED_VOCAB
from omni.tuning import Overrides
from omni_engine import OmniEngine

needs_kernel = pytest.mark.skipif(rowkernels.load("q8rows") is None,
                                  reason=f"q8rows unavailable: {rowkernels.why_not('q8rows')}")
needs_f32 = pytest.mark.skipif(rowkernels.load("f32rows") is None,
                               reason=f"f32rows unavailable: {rowkernels.why_not('f32rows')}")


def reference(x, weight, bias=None):
    """The kernel's formula in torch: rows quantized on their own, exact integer sums, then the scales."""
    q, scale = int8_rows(weight)
    amax = x.abs().amax(dim=-1, keepdim=True)
    xq = torch.round(x * (127.0 / amax)).clamp(-127, 127)
    dots = xq.to(torch.int64) @ q.to(torch.int64).T
    out = dots.float() * ((amax / 127.0) * scale)
    return out if bias is None else out + bias


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 128), (37, 130), (4864 // 8, 896)])
def test_rows_are_exact_integer_sums_computed_one_by_one(shape):
    torch.manual_seed(0)
    w, b = torch.randn(*shape) * 0.05, torch.randn(shape[0])
    layer = RowsLinear(Q8Table(w), b)
    x = torch.randn(11, shape[1]) * torch.logspace(-2, 2, 11)[:, None]  # very different row ranges
    together = layer(x)
    assert torch.equal(together, reference(x, w, b))
    assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(11)]))
    ref = nn.functional.linear(x, w, b)
    assert ((together - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.03


@needs_kernel
def test_fast_engine_on_q8rows_keeps_one_table(tiny_ckpt, sample_wav, monkeypatch):
    monkeypatch.setenv("MINI_OMNI_INT8", "q8rows")
    fast = OmniEngine(tiny_ckpt, device="cpu", mode="fast")
    assert fast.model.lm_head.table is fast.model.transformer.wte.table
    assert isinstance(fast.model.transformer.h[0].mlp.fc_1.table, Q8Table)
    assert len(fast.run(sample_wav, max_tokens=100).streams[0]) > 0


def test_the_kernel_is_chosen_by_measurement_and_falls_back_to_fbgemm(monkeypatch):
    assert runtime.choose_int8_kernel({"fbgemm": 1.0, "q8rows": 1.02}) == "q8rows"  # ties: one table less
    assert runtime.choose_int8_kernel({"fbgemm": 1.0, "q8rows": 1.5}) == "fbgemm"
    monkeypatch.setitem(rowkernels._loaded, "q8rows", None)
    monkeypatch.setitem(rowkernels._why_not, "q8rows", "the CPU lacks avx512_vnni")
    assert runtime.int8_kernel(64, 32, Overrides.from_env()) == "fbgemm"
    monkeypatch.setenv("MINI_OMNI_INT8", "q8rows")
    with pytest.raises(ValueError, match="avx512_vnni"):
        runtime.int8_kernel(64, 32, Overrides.from_env())
    monkeypatch.setenv("MINI_OMNI_INT8", "mkl")
    with pytest.raises(ValueError, match="MINI_OMNI_INT8"):
        runtime.int8_kernel(64, 32, Overrides.from_env())


@needs_f32
@pytest.mark.parametrize("shape", [(64, 128), (37, 130), (4864 // 8, 896)])
def test_f32_rows_are_computed_one_by_one(shape):
    torch.manual_seed(3)
    w, b = torch.randn(*shape), torch.randn(shape[0])
    layer = RowsLinear(F32Table(w), b)
    x = torch.randn(13, shape[1])  # two tiles of 6 rows and one of 1
    together = layer(x)
    assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(13)]))
    torch.testing.assert_close(together, nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["q8rows", "f32rows"])
def test_head_and_embedding_share_one_table(kind):
    if rowkernels.load(kind) is None:
        pytest.skip(f"{kind} unavailable: {rowkernels.why_not(kind)}")
    torch.manual_seed(4)
    weight = torch.randn(PADDED_VOCAB, 40)
    table = (Q8Table if kind == "q8rows" else F32Table)(weight)
    idx = torch.randint(0, PADDED_VOCAB, (2, 8, 3))
    assert torch.equal(table.lookup(idx), Int8Embedding(weight)(idx) if kind == "q8rows" else weight[idx])
    head = RowsHead(table)
    x = torch.randn(2, 40)
    audio, text = head.rows(x, ("audio", "text"))
    full = head(x)
    assert torch.equal(audio, full[0, HEAD_PARTS["audio"]]) and torch.equal(text, full[1, HEAD_PARTS["text"]])
    ref = x @ weight.T
    assert ((full - ref).norm(dim=1) / ref.norm(dim=1)).max() < (0.03 if kind == "q8rows" else 1e-6)


def test_f32rows_takes_a_group_only_when_it_beats_the_library_plans(monkeypatch):
    rows = linear.TUNED_ROWS
    table = {("linear", None): {n: 1.0 for n in rows}, ("linear", 1): {n: float(n) for n in rows},
             **{("wxt", b): {n: 0.5 for n in rows} for b in linear.BLOCK_ROWS}}
    monkeypatch.setattr(tuning, "batch_invariant", lambda c, w: True)
    for kernel, wins in ((0.3, True), (0.5, False)):  # a tie keeps the library
        times = {**table, ("f32rows", None): {n: kernel for n in rows}}
        monkeypatch.setattr(tuning, "measure_products",
                            lambda w, plans, rows: {c: {n: times[c][n] for n in rows} for c in plans})
        assert tuning.choose_products([torch.randn(4, 4)], ("wxt", "f32rows")).kernel == wins


@needs_f32
def test_f32rows_is_refused_for_a_model_in_another_dtype(monkeypatch):
    monkeypatch.setenv("MINI_OMNI_PRODUCTS", "f32rows")
    assert tuning.tune_products({"a": [torch.randn(4, 4)]}, Overrides.from_env())["a"].kernel
    with pytest.raises(ValueError, match="computes in fp32"):
        tuning.tune_products({"a": [torch.randn(4, 4, dtype=torch.bfloat16)]}, Overrides.from_env())


def test_a_built_kernel_is_reused_without_running_the_compiler(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nfor last; do :; done\n: > "$last"\n')  # "builds" its -o file
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    kernel = rowkernels.KERNELS["f32rows"]
    first = rowkernels._build("f32rows", kernel, tmp_path / "cache")
    assert rowkernels._build("f32rows", kernel, tmp_path / "cache") == first
    assert len(calls.read_text().splitlines()) == 1  # one build; nothing run on the second load


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(rowkernels, "_loaded", {})
    monkeypatch.setattr(rowkernels, "_why_not", {})
    monkeypatch.setattr(rowkernels, "cpu_flags", lambda: set(rowkernels.KERNELS["f32rows"].cpu_flags))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="no C compiler"):
        assert rowkernels.load("f32rows", tmp_path) is None
    assert "no C compiler" in rowkernels.why_not("f32rows")
