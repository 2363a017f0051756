"""Launch configuration of the Triton backend that needs no kernel run to check: the persistent one-pass grid
derived from the compiled kernel's occupancy (``_blocks_per_sm``, ``_persistent_grid``, ``_programs`` with mocked
device properties and mocked compiled metadata), its interpreter fallback, and the ``OUT_ALIGNED`` predicate of
the unaligned-vocabulary row split. The kernels' numbers are checked in ``test_triton_kernels.py``.

The numbers below are an H100 / H200 (sm_90: 132 SMs, 64K registers, 2048 threads, 32 blocks and 228 KiB of
shared memory per SM, 50 MiB of L2). The bf16 one-pass kernel at a large vocabulary is compiled with 32 warps
and 51-64 registers per thread (``.ci/check_triton_sm90.py``): one block per SM.
"""

import types

import pytest
import torch

import kernel_cases as KC
from grpo_kernels.kernels import triton_impl as tk

ROWS = 8192  # S·T of a typical micro-batch


@pytest.fixture
def h100():
    return tk._DeviceLimits()  # the documented defaults are H100's


def _kernel(n_regs, num_warps, shared=0):
    return tk._KernelResources(n_regs=n_regs, num_warps=num_warps, shared=shared)


def test_h100_defaults(h100):
    assert (h100.sms, h100.regs_per_sm, h100.max_threads_per_sm, h100.max_blocks_per_sm) == (132, 65536, 2048, 32)
    assert h100.shared_per_sm == 228 * 1024 and h100.l2_bytes == 50 * 2 ** 20


@pytest.mark.parametrize("n_regs,num_warps,shared,blocks", [
    (64, 32, 128, 1),  # the bf16 one-pass kernel: the whole register file (64·1024 = 65536)
    (51, 32, 128, 1),  # rounded up to 56 per thread: still one block
    (32, 8, 0, 8),  # 8 blocks by registers and by threads
    (62, 16, 64, 2),  # 64·512 registers per block: two
    (124, 8, 64, 2),  # fp64 one-pass: 128·256 per block
    (255, 4, 0, 2),  # 256 registers per thread: 8 warps by registers
    (16, 1, 100 * 1024, 2),  # shared memory (plus the 1 KiB per-block reservation) bounds it
    (8, 1, 0, 32),  # the block slots bound it
    (16, 32, 0, 2),  # the thread slots bound it
])
def test_blocks_per_sm(h100, n_regs, num_warps, shared, blocks):
    assert tk._blocks_per_sm(_kernel(n_regs, num_warps, shared), h100) == blocks


def test_persistent_grid_never_launches_a_second_wave(h100):
    """V = 32,000 in bf16 with the one-pass kernel's 64 registers × 32 warps: one block per SM, so 132 programs on
    132 SMs. The old heuristic (up to 4 programs per SM, here the L2 fit of 204) launched 204: a second wave."""
    row_bytes = 32_000 * 2
    fit = (h100.l2_bytes // 2) // (2 * row_bytes)
    assert fit == 204  # what the old heuristic launched: min(rows, max(SMs, min(fit, 4·SMs)))
    assert tk._persistent_grid(ROWS, row_bytes, _kernel(64, 32, 128), h100) == 132
    # a lighter kernel (32 registers × 8 warps: 8 blocks per SM) may have more in flight, up to the L2 fit
    assert tk._persistent_grid(ROWS, row_bytes, _kernel(32, 8), h100) == 204
    # fewer rows than slots: one program per row
    assert tk._persistent_grid(100, row_bytes, _kernel(64, 32, 128), h100) == 100
    # V = 151,936: the L2 fit (43) is below one per SM; the floor of one program per SM holds
    assert tk._persistent_grid(ROWS, 151_936 * 2, _kernel(32, 8), h100) == 132
    assert tk._persistent_grid(ROWS, 151_936 * 2, _kernel(64, 32, 128), h100) == 132
    # a smaller GPU: the residency, not the SM count, is the cap
    small = tk._DeviceLimits(sms=20, l2_bytes=4 * 2 ** 20)
    assert tk._persistent_grid(ROWS, 1000 * 4, _kernel(64, 16), small) == 40  # 2 blocks × 20 SMs < L2 fit (262)


def _fake_cuda_logits(V, dtype=torch.bfloat16, rows=ROWS):
    """What ``_programs`` reads of the logits: shape, device, element size."""
    return types.SimpleNamespace(shape=(1, rows, V), device=torch.device("cuda", 0),
                                 element_size=lambda: torch.empty((), dtype=dtype).element_size())


def test_programs_uses_the_compiled_kernels_metadata(monkeypatch):
    """``_programs`` with mocked device properties and mocked compiled metadata (a ``CompiledKernel``-like object
    whose binary 'loads' with 64 registers)."""
    props = types.SimpleNamespace(multi_processor_count=132, L2_cache_size=50 * 2 ** 20, major=9, minor=0,
                                  regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472, warp_size=32)
    monkeypatch.setattr(tk, "_device_limits", lambda device: tk._limits_from_props(props))
    loaded = []
    compiled = types.SimpleNamespace(_init_handles=lambda: loaded.append(1), n_regs=64,
                                     metadata=types.SimpleNamespace(num_warps=32, shared=128))
    res = tk._resources_of(compiled)
    assert res == _kernel(64, 32, 128) and loaded == [1]
    bv, nw = tk._launch_config(32_000, torch.bfloat16, None, None, one_pass=True)
    assert (bv, nw) == (16384, 32)
    logits = _fake_cuda_logits(32_000)
    assert tk._programs(logits, ROWS, bv, nw, None, lambda: res) == 132
    assert tk._programs(logits, ROWS, bv, nw, None, lambda: _kernel(32, 8)) == 204
    # an explicit ``programs`` wins; a row that fits one chunk gets one program per row
    assert tk._programs(logits, ROWS, bv, nw, 500, lambda: res) == 500
    assert tk._programs(_fake_cuda_logits(16_000), ROWS, bv, nw, None, lambda: res) == ROWS


def test_programs_falls_back_to_the_worst_case_without_metadata(h100, monkeypatch):
    """No compiled metadata (the interpreter, or a Triton that does not tell): the registers ptxas may give at
    most for the block size, which never overestimates the residency."""
    assert tk._worst_case_resources(32, h100) == _kernel(64, 32)
    assert tk._worst_case_resources(16, h100) == _kernel(128, 16)
    assert tk._worst_case_resources(1, h100).n_regs == 255
    for w in (1, 2, 4, 8, 16, 32):
        worst = tk._blocks_per_sm(tk._worst_case_resources(w, h100), h100)
        for regs in (16, 32, 64, 128, 255):
            if regs * 32 * w <= 65536:  # a block ptxas could compile
                assert worst <= tk._blocks_per_sm(_kernel(regs, w), h100)
    monkeypatch.setattr(tk, "_device_limits", lambda device: h100)
    assert tk._programs(_fake_cuda_logits(32_000), ROWS, 16384, 32, None, lambda: None) == 132
    assert tk._resources_of(types.SimpleNamespace(_init_handles=lambda: None)) is None  # no n_regs


def test_device_limits_from_partial_properties():
    """Whatever torch does not report keeps the H100 value; the block slots come from the compute capability."""
    lim = tk._limits_from_props(types.SimpleNamespace(multi_processor_count=84, major=8, minor=9, L2_cache_size=0))
    assert lim == tk._DeviceLimits(sms=84, max_blocks_per_sm=24)
    a100 = types.SimpleNamespace(multi_processor_count=108, major=8, minor=0, L2_cache_size=40 * 2 ** 20,
                                 shared_memory_per_multiprocessor=167936)
    lim = tk._limits_from_props(a100)
    assert (lim.sms, lim.l2_bytes, lim.shared_per_sm, lim.max_blocks_per_sm) == (108, 40 * 2 ** 20, 167936, 32)
    assert tk._device_limits(torch.device("cpu")) is None


def test_interpreter_has_no_metadata_and_the_one_pass_kernel_still_runs(triton_interpret, monkeypatch):
    """Under TRITON_INTERPRET nothing is compiled: ``_compiled_resources`` is None and the grid comes from the
    worst case. With limits mocked for the CPU device (3 SMs) the persistent grid is 24 programs for 30 rows
    (1 warp: 8 blocks per SM by the worst-case registers), and the results are those of the reference."""
    monkeypatch.setattr(tk, "_device_limits", lambda device: tk._DeviceLimits(sms=3))
    grids = []
    real = tk._persistent_grid
    monkeypatch.setattr(tk, "_persistent_grid", lambda *a: grids.append(real(*a)) or grids[-1])
    z, tok, m, _ = KC.make_inputs(torch.float32)
    keep = KC.keep_mask(tok, m)
    _, fwd_grad = tk._kernels()[1:]
    assert tk._compiled_resources(fwd_grad, (), {}) is None
    coef = torch.randn(KC.S, KC.T)
    lp, _, ent, grad = tk.logprobs_fwd_grad(z, tok, keep, coef, 0.8, True, block_v=16)
    assert grids == [24]
    zz = z.clone().requires_grad_(True)
    rlp, rent = KC.ref_logprobs(zz, tok, keep, 0.8)
    (coef * rlp).sum().backward()
    torch.testing.assert_close(lp, rlp.detach(), **KC.tol(torch.float32))
    torch.testing.assert_close(grad, zz.grad, **KC.gtol(torch.float32))


def test_rows_aligned_alike():
    """``OUT_ALIGNED``: every gradient row starts at the logits row's address modulo 16 bytes."""
    z = torch.randn(3, 4, 67)
    assert tk._rows_aligned_alike(z, z)
    assert tk._rows_aligned_alike(torch.empty_like(z), z)
    base = torch.empty(3, 4, 70)
    view = base[..., 1:68]  # stride 70, starting one element in
    assert not tk._rows_aligned_alike(view, z)
    assert tk._rows_aligned_alike(view, view)
    # strides equal modulo 4 elements (16 bytes of fp32) and a start 4 elements in: aligned alike
    other = torch.empty(3, 4, 67 + 4 * 9)[..., 4:71]
    assert other.stride(1) == 103 and tk._rows_aligned_alike(other, z)
    assert not tk._rows_aligned_alike(torch.empty(3, 4, 68)[..., :67], z)  # row t starts t elements off
    sliced = torch.empty(3 * 4 * 67 + 4)[4:].view(3, 4, 67)
    assert tk._rows_aligned_alike(sliced, z)
    # a size-1 dimension's stride does not matter
    one = torch.empty(1, 4, 67)
    assert tk._rows_aligned_alike(one.as_strided((1, 4, 67), (5, 67, 1)), one)


@pytest.mark.gpu
def test_gpu_one_pass_grid_is_resident(monkeypatch):
    """On a GPU: the compiled one-pass kernel reports its registers, and the grid never exceeds what the SMs
    hold at once."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, t, v = 1, 4096, 32_000
    z, tok, m, _ = KC.make_inputs(torch.bfloat16, device="cuda", s=s, t=t, v=v)
    keep = KC.keep_mask(tok, m)
    seen = []
    real = tk._persistent_grid
    monkeypatch.setattr(tk, "_persistent_grid", lambda *a: seen.append((a, real(*a))) or seen[-1][1])
    tk.logprobs_fwd_grad(z, tok, keep, torch.randn(s, t, device="cuda"), 1.0, False)
    (n_rows, row_bytes, kernel, limits), grid = seen[0]
    assert kernel.n_regs > 0 and kernel.num_warps == 32
    assert grid <= limits.sms * tk._blocks_per_sm(kernel, limits)
    props = torch.cuda.get_device_properties(0)
    assert limits.sms == props.multi_processor_count


def test_compiled_resources_are_looked_up_once_per_specialization(monkeypatch):
    """The launch path asks the compiled kernel for its registers/shared memory: one warmup lookup per
    specialization, not one per call."""
    from grpo_kernels.kernels import triton_impl as ti

    calls = []

    class FakeCompiled:
        n_regs = 64
        metadata = type("M", (), {"shared": 0, "num_warps": 8})()

        def _init_handles(self):
            pass

    class FakeKernel:
        def warmup(self, *args, grid, **meta):
            calls.append(meta)
            return FakeCompiled()

    monkeypatch.setattr(ti, "_interpreting", lambda: False)
    monkeypatch.setattr(ti, "_RESOURCES_CACHE", {})
    k = FakeKernel()
    x = torch.zeros(4, 16)
    for _ in range(3):
        assert ti._compiled_resources(k, (x, 16, 1.0), {"BLOCK_V": 1024}) is not None
    assert len(calls) == 1
    ti._compiled_resources(k, (x, 17, 1.0), {"BLOCK_V": 1024})  # another specialization (17 % 16 != 0)
    ti._compiled_resources(k, (x, 16, 1.0), {"BLOCK_V": 2048})  # another constexpr
    assert len(calls) == 3
