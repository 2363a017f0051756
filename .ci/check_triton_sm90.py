"""Compile the Triton kernels of grpo_kernels/kernels/triton_impl.py for a CUDA target without a GPU.

Runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) for every
kernel x logits dtype x flag combination, under two argument specializations a launch can get:

``aligned``
    16-byte aligned logits/out pointers, ``V`` and the row strides divisible by 16 (e.g. V = 151,936);
``unaligned``
    nothing about the rows divisible by 16: ``V``, the strides and the logits/out pointers (V = 151,935,
    50,257, 32,003, or a view whose rows start at odd offsets). Per-row tensors stay aligned (fresh
    allocations).

``T`` / ``n_rows`` are unspecialized, as in the kernels' ``do_not_specialize``. It prints registers, spills,
shared memory and the number of vector loads / stores (``ld.global.v2/v4``, ``st.global.v2/v4``) in the PTX.

It FAILS when a kernel does not compile, or when a row loop runs on scalar accesses: every kernel must have at
least one vector load per row loop (fwd 1, bwd 1, fwd_grad 2: pass 1 and pass 2), and the gradient kernels one
vector store per writing loop (the gradient loop and the masked rows' zero fill: 2), in both specializations.
The kernels' only vector accesses are row accesses (the per-row scalars are single loads), so counting them in
the whole PTX is enough. The variant with ``OUT_ALIGNED=False`` (gradient rows not aligned like the logits
rows, see triton_impl's module doc) is compiled too, without the vector-store requirement: its stores are
scalar by design. At commit 36b3cdc, before the row split, the unaligned specialization had no vector
access at all.

    python .ci/check_triton_sm90.py [--arch 90] [--block-v N] [--num-warps W]

``BLOCK_V`` / ``num_warps`` default to what the launchers pick for a large vocabulary (``_launch_config``).

Needs only triton (and torch for the package import); no CUDA device, no driver.
"""

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, whatever the calling shell asks for

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from grpo_kernels.kernels import triton_impl as tk  # noqa: E402

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}
FLAGS = ("WITH_ENTROPY", "HAS_GRAD_ENT", "HAS_ENT_COEF")  # the kernels' boolean feature switches
ROW_PTRS = ("logits_ptr", "out_ptr")  # pointers into (S, T, V) rows; the others point to per-row tensors
ROW_INTS = ("V", "stride_s", "stride_t", "out_stride_s", "out_stride_t")
MIN_VECTOR_LOADS = {"fwd": 1, "bwd": 1, "fwd_grad": 2}  # one per row loop that reads the logits
MIN_VECTOR_STORES = {"fwd": 0, "bwd": 2, "fwd_grad": 2}  # the gradient loop(s) and the masked rows' zero fill
VEC_LD = re.compile(r"\bld\.global[\w.:]*?\.v[248]\.")  # e.g. "@%p1 ld.global.v4.b32 { .. }, [ %rd1 + 0 ];"
VEC_ST = re.compile(r"\bst\.global[\w.:]*?\.v[248]\.")


def kernels():
    """(name, JITFunction) of the launchers' kernels, exactly as the module builds them (helpers included)."""
    fwd, bwd, fwd_grad = tk._kernels()
    return [("fwd", fwd), ("bwd", bwd), ("fwd_grad", fwd_grad)]


def signature(jit_fn, dtype: str):
    """Triton signature of a kernel for one logits dtype, from its parameter names (see ROW_PTRS)."""
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    sig = {}
    for p in jit_fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in ROW_PTRS:
            sig[n] = PTR[dtype]
        elif n == "tokens_ptr":
            sig[n] = "*i64"
        elif n == "mask_ptr":
            sig[n] = "*u8"
        elif n.endswith("_ptr"):
            sig[n] = acc
        elif n == "inv_tau":
            sig[n] = "fp64"
        else:
            sig[n] = "i32"
    return sig


def divisibility(jit_fn, sig, aligned: bool):
    """The ``tt.divisibility = 16`` attributes a launch would specialize on."""
    attrs = {}
    for i, p in enumerate(jit_fn.params):
        kind = sig[p.name]
        if kind == "constexpr" or p.do_not_specialize or kind == "fp64":
            continue
        if not aligned and (p.name in ROW_PTRS or p.name in ROW_INTS):
            continue
        attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def variants(jit_fn):
    """Dicts of flag values to compile: every combination of the kernel's feature flags (``HAS_ENT_COEF``
    only with ``WITH_ENTROPY``, as the launcher passes it), each with ``OUT_ALIGNED`` on, plus one with it off."""
    names = [p.name for p in jit_fn.params]
    flags = [f for f in FLAGS if f in names]
    out = []
    for values in itertools.product((False, True), repeat=len(flags)):
        v = dict(zip(flags, values))
        if v.get("HAS_ENT_COEF") and not v.get("WITH_ENTROPY"):
            continue
        if "OUT_ALIGNED" in names:
            v["OUT_ALIGNED"] = True
        out.append(v)
    if "OUT_ALIGNED" in names:
        out.append({**out[-1], "OUT_ALIGNED": False})
    return out


def resource_usage(cubin: bytes) -> str:
    """``REG:.. STACK:..`` from cuobjdump (Triton's bundled one, else PATH's); '' when neither exists."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)}" if m else ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--block-v", type=int, default=None, help="default: the launch heuristic's, for a large V")
    ap.add_argument("--num-warps", type=int, default=None, help="default: the launch heuristic's")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failures = 0
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        for name, jit_fn in kernels():
            sig = signature(jit_fn, dtype)
            block_v, num_warps = tk._launch_config(1 << 20, TORCH_DTYPE[dtype], args.block_v, args.num_warps,
                                                   one_pass=(name == "fwd_grad"))
            fixed = {"BLOCK_V": block_v, "RNE_BF16": False,  # compiled kernels round natively
                     "VEC": 16 // TORCH_DTYPE[dtype].itemsize}
            for flags, aligned in itertools.product(variants(jit_fn), (True, False)):
                constexprs = {k: v for k, v in {**fixed, **flags}.items() if k in sig}
                src = ASTSource(jit_fn, sig, constexprs, divisibility(jit_fn, sig, aligned))
                shown = " ".join(f"{k}={int(v)}" for k, v in flags.items())
                label = (f"{name:8s} {dtype:4s} {'aligned' if aligned else 'unaligned':9s} {shown:40s} "
                         f"BLOCK_V={block_v:5d} num_warps={num_warps:2d}")
                try:
                    k = triton.compile(src, target=target, options={"num_warps": num_warps})
                except Exception as e:  # report every failure, not just the first
                    failures += 1
                    print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                ptx = k.asm["ptx"]
                n_ld, n_st = len(VEC_LD.findall(ptx)), len(VEC_ST.findall(ptx))
                problems = []
                if n_ld < MIN_VECTOR_LOADS[name]:
                    problems.append(f"{n_ld} vector loads, want >= {MIN_VECTOR_LOADS[name]} (a row loop is scalar)")
                if flags.get("OUT_ALIGNED", True) and n_st < MIN_VECTOR_STORES[name]:
                    problems.append(f"{n_st} vector stores, want >= {MIN_VECTOR_STORES[name]} (rows written scalar)")
                failures += bool(problems)
                print(f"{'FAIL' if problems else 'ok  '} {label}: {resource_usage(k.asm['cubin'])} "
                      f"shared={k.metadata.shared} vec_ld={n_ld} vec_st={n_st}"
                      + (f"  <- {'; '.join(problems)}" if problems else ""))
    print("FAILED" if failures else "all kernels compiled with vector row accesses", f"({failures} failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
