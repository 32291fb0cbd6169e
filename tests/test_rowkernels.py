"""The project's own few-row kernels: the int8 ones (q8rows on AVX512-VNNI, q8avxvnni, q8avx2, q8neon on
ARM64) give the same exact per-row integer sums, bit for bit; f32rows (fp32, AVX-512) fixed-order sums;
each keeps one table for head and embedding; each is chosen by measurement with a fallback. A kernel for
another CPU runs in a C harness (tests/csrc/q8harness.c), under qemu-user where the CPU differs."""
import copy
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from omni import linear, rowkernels, runtime, tuning
from omni.linear import HEAD_PARTS, Int8Embedding, int8_rows
from omni.model import SwiGLU
from omni.rowkernels import Q8_KERNELS, F32Table, Q8Table, RowsHead, RowsLinear, RowsSwiGLU, q8_layout
from omni.tokens import PADDED_VOCAB
from omni.tuning import Overrides
from omni_engine import OmniEngine

HARNESS = Path(__file__).with_name("csrc") / "q8harness.c"
ARM_CC, ARM_ROOT = "aarch64-linux-gnu-gcc", "/usr/aarch64-linux-gnu"  # Debian: gcc-aarch64-linux-gnu
QEMU_ARM = "qemu-aarch64"  # Debian: qemu-user
needs_f32 = pytest.mark.skipif(rowkernels.load("f32rows") is None,
                               reason=f"f32rows unavailable: {rowkernels.why_not('f32rows')}")
SHAPES = [(64, 128), (37, 130), (4864 // 8, 896)]


def loaded(kind):
    if rowkernels.load(kind) is None:
        pytest.skip(f"{kind} unavailable: {rowkernels.why_not(kind)}")


def reference(x, weight, bias=None):
    """The kernel's formula in torch: rows quantized on their own, exact integer sums, then the scales."""
    q, scale = int8_rows(weight)
    amax = x.abs().amax(dim=-1, keepdim=True)
    xq = torch.round(x * (127.0 / amax)).clamp(-127, 127)
    dots = xq.to(torch.int64) @ q.to(torch.int64).T
    out = dots.float() * ((amax / 127.0) * scale)
    return out if bias is None else out + bias


def extremes(K):
    """Rows quantized to +-127 in the sign patterns that load a product most: equal signs throughout
    (every byte pair 2 * 127 * 127, the most vpmaddubsw's int16 can hold), opposite signs, alternating,
    and random; inputs likewise, where q8rows's offset form would be 255 * 127 per byte."""
    generator = torch.Generator().manual_seed(5)
    alternating = torch.tensor([1.0, -1.0]).repeat(K // 2)
    signs = torch.stack([torch.ones(K), -torch.ones(K), alternating, -alternating,
                         torch.randint(0, 2, (K,), generator=generator).float() * 2 - 1])
    return signs.repeat(4, 1), signs  # weights (20, K), inputs (5, K)


def sample(shape, rows=11):
    torch.manual_seed(0)
    w, b = torch.randn(*shape) * 0.05, torch.randn(shape[0])
    x = torch.randn(rows, shape[1]) * torch.logspace(-2, 2, rows)[:, None]  # very different row ranges
    return w, b, x


@pytest.mark.parametrize("kind", Q8_KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rows_are_exact_integer_sums_computed_one_by_one(kind, shape):
    loaded(kind)
    w, b, x = sample(shape)
    layer = RowsLinear(Q8Table(w, kind), b)
    together = layer(x)
    assert torch.equal(together, reference(x, w, b))
    assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(11)]))
    ref = nn.functional.linear(x, w, b)
    assert ((together - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.03


@pytest.mark.parametrize("kind", Q8_KERNELS)
def test_extreme_values_do_not_saturate(kind):
    loaded(kind)
    K = 4864  # the longest rows of a step (the MLP's down projection)
    w, x = extremes(K)
    out = RowsLinear(Q8Table(w, kind), None)(x)
    assert torch.equal(out, reference(x, w))
    torch.testing.assert_close(out, x @ w.T, rtol=1e-6, atol=0)  # +-K where the signs agree throughout


def build_harness(cc, kind, exe):
    """The C harness linked with `kind`'s source and flags (an executable, not a shared library)."""
    kernel = rowkernels.KERNELS[kind]
    flags = [f for f in kernel.compile_flags if f not in ("-shared", "-fPIC")]
    source = rowkernels.SOURCES / f"{kernel.source}.c"
    done = subprocess.run([cc, *flags, f"-DKERNEL_ENTRY={kernel.source}_linear", str(source), str(HARNESS),
                           "-o", str(exe)], capture_output=True, text=True, timeout=rowkernels.BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return exe


def run_harness(command, kind, tmp_path, x, w, b=None):
    """`x @ w.T (+ b)` by the harness `command` of kernel `kind`, through its table layout."""
    blocks, scale, qsum = q8_layout(w, rowkernels.KERNELS[kind].pass_rows)
    Np, Kp = scale.numel(), blocks.size(2) * rowkernels.Q8_CHUNK
    rows = nn.functional.pad(x, (0, Kp - x.size(1)))
    bias = None if b is None else nn.functional.pad(b, (0, Np - b.numel()))
    head = np.array([rows.size(0), Kp, Np, bias is not None], np.int32)
    parts = [head, rows.numpy(), blocks.numpy(), scale.numpy(), qsum.numpy()] + ([] if bias is None else [bias.numpy()])
    (tmp_path / "in").write_bytes(b"".join(p.tobytes() for p in parts))
    subprocess.run([*command, str(tmp_path / "in"), str(tmp_path / "out")], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    out = torch.from_numpy(np.fromfile(tmp_path / "out", np.float32)).view(rows.size(0), Np)
    return out[:, :w.size(0)]


def check_in_harness(command, kind, tmp_path):
    for shape in SHAPES:
        w, b, x = sample(shape)
        assert torch.equal(run_harness(command, kind, tmp_path, x, w, b), reference(x, w, b)), shape
    w, x = extremes(4864)
    assert torch.equal(run_harness(command, kind, tmp_path, x, w), reference(x, w))


@pytest.mark.skipif(not (shutil.which(ARM_CC) and shutil.which(QEMU_ARM) and Path(ARM_ROOT).is_dir()),
                    reason=f"needs {ARM_CC} and {QEMU_ARM} (Debian: gcc-aarch64-linux-gnu, qemu-user)")
def test_the_arm64_kernel_under_qemu(tmp_path):
    exe = build_harness(ARM_CC, "q8neon", tmp_path / "q8neon")
    check_in_harness([QEMU_ARM, "-L", ARM_ROOT, str(exe)], "q8neon", tmp_path)


def test_the_harness_runs_the_avx2_kernel(tmp_path):
    """The harness itself, checked where it runs natively."""
    loaded("q8avx2")
    check_in_harness([str(build_harness(shutil.which("cc") or "gcc", "q8avx2", tmp_path / "q8avx2"))], "q8avx2",
                     tmp_path)


def test_the_avx_vnni_kernel_builds_with_256_bit_vpdpbusd(tmp_path):
    """AVX-VNNI is checked natively where the CPU has it (above); Debian's qemu-user (7.2) does not
    emulate it, so elsewhere this checks its build: VEX-encoded vpdpbusd on ymm registers."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils)")
    exe = build_harness(shutil.which("cc") or "gcc", "q8avxvnni", tmp_path / "q8avxvnni")
    listing = subprocess.run([objdump, "-d", str(exe)], check=True, capture_output=True, text=True).stdout
    dots = [line for line in listing.splitlines() if "vpdpbusd" in line]
    assert dots and all("{vex}" in line and "%ymm" in line for line in dots), dots[:3]


@pytest.mark.parametrize("kind", Q8_KERNELS)
def test_fast_engine_on_a_forced_int8_kernel_keeps_one_table(kind, tiny_ckpt, sample_wav, monkeypatch):
    loaded(kind)
    monkeypatch.setenv("MINI_OMNI_INT8", kind)
    fast = OmniEngine(tiny_ckpt, device="cpu", mode="fast")
    assert fast.model.lm_head.table is fast.model.transformer.wte.table
    table = fast.model.transformer.h[0].mlp.fc_12.table
    assert isinstance(table, Q8Table) and table.kernel == kind
    assert len(fast.run(sample_wav, max_tokens=100).streams[0]) > 0


@pytest.mark.parametrize("kind", Q8_KERNELS)
@pytest.mark.parametrize("shape", [(64, 128), (40, 130)])  # hidden width on whole blocks, and not
@pytest.mark.parametrize("rows", [1, 2, 33])  # a decode step, a batch, more than a prefill chunk
def test_fused_mlp_equals_the_unfused_one_bit_for_bit(kind, shape, rows):
    """fc_1 and fc_2 as one table (one call, one quantization of x) give the unfused layers' exact bits."""
    loaded(kind)
    hidden, width = shape
    torch.manual_seed(1)
    mlp = SwiGLU(width, hidden, width)
    unfused = copy.deepcopy(mlp)
    linear.install(unfused, lambda lin: RowsLinear(Q8Table(lin.weight, kind), lin.bias))
    fused = RowsSwiGLU(mlp, lambda weight: Q8Table(weight, kind))
    x = torch.randn(rows, 3, width) * torch.logspace(-2, 2, 3)[:, None]
    assert torch.equal(fused(x), unfused(x))


@pytest.mark.parametrize("kind", Q8_KERNELS)
def test_threads_multiplying_at_once_each_use_their_own_scratch(kind):
    """The kernel's quantized rows live in per-thread scratch memory, kept between calls: threads that
    multiply at the same time (ctypes lets go of the GIL) still get the single-threaded results."""
    loaded(kind)
    w, b, x = sample(SHAPES[1], rows=33)
    layer = RowsLinear(Q8Table(w, kind), b)
    inputs = [x[:rows] * (1 + rows) for rows in (1, 2, 33, 3)]  # the scratch grows and is reused
    expected = [layer(xi) for xi in inputs]
    results: list[list[bool]] = []

    def worker():
        results.append([torch.equal(layer(xi), want) for _ in range(20) for xi, want in zip(inputs, expected)])

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(threads) and all(all(r) for r in results)


def test_the_kernel_is_chosen_by_measurement_and_falls_back_to_fbgemm(monkeypatch):
    assert runtime.choose_int8_kernel({"fbgemm": 1.0, "q8rows": 1.02}) == "q8rows"  # ties: one table less
    assert runtime.choose_int8_kernel({"fbgemm": 1.0, "q8rows": 1.5}) == "fbgemm"
    assert runtime.choose_int8_kernel({"fbgemm": 1.0, "q8avx2": 1.5, "q8avxvnni": 0.9}) == "q8avxvnni"
    for kind in Q8_KERNELS:
        monkeypatch.setitem(rowkernels._loaded, kind, None)
        monkeypatch.setitem(rowkernels._why_not, kind, "the CPU lacks avx512_vnni")
    assert runtime.int8_kernel(64, 32, Overrides.from_env()) == "fbgemm"
    monkeypatch.setenv("MINI_OMNI_INT8", "q8rows")
    with pytest.raises(ValueError, match="avx512_vnni"):
        runtime.int8_kernel(64, 32, Overrides.from_env())
    monkeypatch.setenv("MINI_OMNI_INT8", "mkl")
    with pytest.raises(ValueError, match="MINI_OMNI_INT8"):
        runtime.int8_kernel(64, 32, Overrides.from_env())


def test_each_int8_kernel_the_cpu_runs_is_measured(monkeypatch):
    measured = {}

    def measure(n_out, n_in, kernels):
        measured["kernels"] = kernels
        return {k: (0.5 if k == kernels[-1] else 1.0) for k in kernels}

    monkeypatch.setattr(runtime, "measure_int8_kernels", measure)
    chosen = runtime.int8_kernel(48, 32, Overrides.from_env())
    assert measured.get("kernels", ("fbgemm",)) == runtime.available_int8_kernels()
    assert chosen == runtime.available_int8_kernels()[-1]


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


@pytest.mark.parametrize("kind", [*Q8_KERNELS, "f32rows"])
def test_head_and_embedding_share_one_table(kind):
    loaded(kind)
    torch.manual_seed(4)
    weight = torch.randn(PADDED_VOCAB, 40)
    int8 = kind in Q8_KERNELS
    table = Q8Table(weight, kind) if int8 else F32Table(weight)
    idx = torch.randint(0, PADDED_VOCAB, (2, 8, 3))
    assert torch.equal(table.lookup(idx), Int8Embedding(weight)(idx) if int8 else weight[idx])
    head = RowsHead(table)
    x = torch.randn(2, 40)
    audio, text = head.rows(x, ("audio", "text"))
    full = head(x)
    assert torch.equal(audio, full[0, HEAD_PARTS["audio"]]) and torch.equal(text, full[1, HEAD_PARTS["text"]])
    ref = x @ weight.T
    assert ((full - ref).norm(dim=1) / ref.norm(dim=1)).max() < (0.03 if int8 else 1e-6)


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
    first = rowkernels._build(kernel, tmp_path / "cache")
    assert rowkernels._build(kernel, tmp_path / "cache") == first
    assert len(calls.read_text().splitlines()) == 1  # one build; nothing run on the second load


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(rowkernels, "_loaded", {})
    monkeypatch.setattr(rowkernels, "_why_not", {})
    monkeypatch.setattr(rowkernels, "cpu_flags", lambda: set(rowkernels.KERNELS["f32rows"].cpu_flags))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="no C compiler"):
        assert rowkernels.load("f32rows", tmp_path) is None
    assert "no C compiler" in rowkernels.why_not("f32rows")
