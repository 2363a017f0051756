"""Compile the Triton kernels of grpo_kernels/triton_kernels.py for a CUDA target without a GPU.

Runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) for every
kernel x logits dtype x flag combination, with the argument specialization a launch would use (16-byte aligned
pointers, strides and V divisible by 16; ``T``/``n_rows`` unspecialized as in ``do_not_specialize``), and
prints registers / spills per kernel. A kernel that Triton cannot compile for the target fails here.

    python .ci/check_triton_sm90.py [--arch 90] [--block-v N] [--num-warps W]

``BLOCK_V`` / ``num_warps`` default to what the launchers pick for a large vocabulary (``_launch_config``).

Needs only triton (and torch for the package import); no CUDA device, no driver.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from grpo_kernels.kernels import triton_impl as tk

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


def signatures(dtype: str):
    """(name, python fn, signature, unspecialized ints, flags) per kernel for one logits dtype."""
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    lg = PTR[dtype]
    fwd = dict(logits_ptr=lg, tokens_ptr="*i64", mask_ptr="*u8", logp_ptr=acc, lse_ptr=acc, ent_ptr=acc,
               T="i32", V="i32", stride_s="i32", stride_t="i32", inv_tau="fp64",
               WITH_ENTROPY="constexpr", BLOCK_V="constexpr")
    bwd = dict(grad_logp_ptr=acc, grad_ent_ptr=acc, logits_ptr=lg, tokens_ptr="*i64", mask_ptr="*u8",
               lse_ptr=acc, ent_ptr=acc, out_ptr=lg, T="i32", V="i32", stride_s="i32", stride_t="i32",
               out_stride_s="i32", out_stride_t="i32", inv_tau="fp64",
               HAS_GRAD_ENT="constexpr", BLOCK_V="constexpr", RNE_BF16="constexpr")
    fg = dict(logits_ptr=lg, tokens_ptr="*i64", mask_ptr="*u8", coef_ptr=acc, logp_ptr=acc, lse_ptr=acc,
              ent_ptr=acc, out_ptr=lg, n_rows="i32", T="i32", V="i32", stride_s="i32", stride_t="i32",
              out_stride_s="i32", out_stride_t="i32", inv_tau="fp64",
              WITH_ENTROPY="constexpr", BLOCK_V="constexpr", RNE_BF16="constexpr")
    return [("fwd", tk._fwd_kernel, fwd, ("T",), ("WITH_ENTROPY",)),
            ("bwd", tk._bwd_kernel, bwd, ("T",), ("HAS_GRAD_ENT",)),
            ("fwd_grad", tk._fwd_grad_kernel, fg, ("n_rows", "T"), ("WITH_ENTROPY",))]


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
        for name, py_fn, sig, unspecialized, (flag,) in signatures(dtype):
            fn = triton.jit(py_fn, do_not_specialize=list(unspecialized))
            block_v, num_warps = tk._launch_config(1 << 20, TORCH_DTYPE[dtype], args.block_v, args.num_warps,
                                                   one_pass=(name == "fwd_grad"))
            for on in (False, True):
                constexprs = {flag: on, "BLOCK_V": block_v}
                if "RNE_BF16" in sig:
                    constexprs["RNE_BF16"] = False  # compiled kernels round natively
                names = list(sig)
                attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
                         if (v.startswith("*") or (v == "i32" and k not in unspecialized))}
                src = ASTSource(fn, sig, constexprs, attrs)
                label = f"{name:8s} {dtype:4s} {flag}={int(on)} BLOCK_V={block_v:5d} num_warps={num_warps:2d}"
                try:
                    k = triton.compile(src, target=target, options={"num_warps": num_warps})
                except Exception as e:  # report every failure, not just the first
                    failures += 1
                    print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                ptx = k.asm["ptx"]
                vec = bool(re.search(r"ld\.global(\.\w+)*\.v[248]", ptx))
                print(f"ok   {label}: {resource_usage(k.asm['cubin'])} shared={k.metadata.shared} "
                      f"vector_loads={vec}")
    print("FAILED" if failures else "all kernels compiled", f"({failures} failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
