"""CPU gate for the Triton kernels (issue 10): compile launch configurations offline for sm_90, no GPU.

``python -m tests.kernels.sm90_gate [--all | --probe | --sass [--runtime] [KERNEL ...]]`` compiles kernel
configurations, reads Triton's own ptxas -v log of each (its flags, its cubin) and prints one JSON line per
configuration: registers, spill bytes, shared memory. Exit status 1 if any configuration spills. ``--all``
(what the test runs, about 3 minutes on 2 CPU cores for 100 configurations) compiles every configuration a
launcher can pick (``prototype_distance.launch_configs()``); without it, a quick representative subset for
development: the configurations the launchers pick for SHAPES (both ends of every tile range, the p tile
resident and not, grad_z's smallest and largest bins of patches). Each distinct configuration is compiled once per
run. ``--probe`` only checks that offline compilation works here. ``--sass`` prints, for the CUB shape's
configurations (grad_z, grad_p, the forward at each precision; or only the KERNELs named), the SASS
instruction mix by opcode class of the whole kernel and of each loop (from a back-edge branch's target to
the branch), read from the cubin with the nvdisasm that ships with Triton (``sass_mix``); with
``--runtime``, of the kernels as the JIT specialises them for the CUB shape's argument values
(``CUB_RUNTIME``). Must run with TRITON_INTERPRET unset or 0 (compiled ``triton.jit``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys

from tests.sass import SASS_CLASSES, disassemble, parse_sass, sass_count  # noqa: F401 (SASS_CLASSES: tests)

# (D, HW, M): the CUB shape, a wide and a large map (largest tiles), a tiny problem and 1 x 1 maps
# (smallest tiles, p resident).
SHAPES = [(128, 49, 2000), (512, 784, 2000), (20, 9, 10), (16, 1, 5)]
CUB_SHAPE = SHAPES[0]
ARCH = 90
# ``--runtime``: the integer arguments the launchers pass at the CUB shape (p contiguous, z as
# ``channels_innermost`` lays it out), by name. Triton's JIT compiles an integer argument equal to 1 as a
# constant and tells the compiler which integers are multiples of 16 and which pointers 16-byte aligned;
# without these values the offline compile sees plain i32 arguments (the kernel the gate checks for every
# configuration, with more address arithmetic and narrower loads than the one launched at this shape).
POINTER_TYPES = {"idx_ptr": "*i64", "cand_ptr": "*i32", "start_ptr": "*i32", "count_ptr": "*i32", "hist_ptr": "*i32",
                 "order_ptr": "*i32"}  # the others: float32
CUB_RUNTIME = dict(B=80, D=128, HW=49, M=2000, stride_zb=128 * 49, stride_zd=1, stride_zk=128, stride_pm=128,
                   stride_pd=1, RUN=32, CHUNKS=63)  # RUN, CHUNKS: grad_z's rows of 2000 / 64 pairs, chunks of 32


def _signature(fn, meta: dict, runtime: dict | None = None) -> tuple[dict, dict, dict]:
    """(types, constexprs, attributes) of ``fn``'s arguments; with ``runtime`` (argument values by name) as
    Triton's JIT specialises them: values equal to 1 become constants, multiples of 16 and (all) pointers
    are marked divisible by 16."""
    types, constexprs, attrs = {}, {}, {}
    runtime = runtime or {}
    for at, name in enumerate(fn.arg_names):
        if name in meta or runtime.get(name) == 1:
            types[name] = "constexpr"
            constexprs[(at,)] = meta[name] if name in meta else 1
            continue
        if name.endswith("_ptr"):
            types[name] = POINTER_TYPES.get(name, "*fp32")
        elif name in ("eps", "one_minus_eps", "coef", "tiny", "res_coef", "sep_coef"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
        if (runtime and name.endswith("_ptr")) or runtime.get(name, 1) % 16 == 0:
            attrs[(at,)] = [["tt.divisibility", 16]]
    return types, constexprs, attrs


def configurations(shapes) -> list[tuple[str, dict, dict]]:
    """Distinct (kernel name, constexprs, options) the launchers pick for these shapes, all precisions."""
    from protokern.kernels import prototype_distance as K

    return K.launch_configs(shapes)


def _compile(name: str, meta: dict, options: dict, runtime: dict | None = None):
    """(compiled kernel, what the compiler printed) of one configuration of kernel ``name`` for sm_90,
    specialised for the ``runtime`` argument values if given (``_signature``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from protokern.kernels import prototype_distance as K

    fn = getattr(K, name)
    types, constexprs, attrs = _signature(fn, meta, runtime)
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")  # no cache hit: ptxas runs, logs
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", ARCH, 32), options=options)
    return kernel, log.getvalue()


def compile_one(name: str, meta: dict, options: dict) -> dict:
    """Compile one kernel configuration for sm_90; registers and spills from Triton's own ptxas run."""
    kernel, log = _compile(name, meta, options)
    return {"kernel": name, **meta, **options, **_ptxas_facts(name, meta, log),
            "shared_bytes": kernel.metadata.shared}


def _ptxas_facts(name: str, meta: dict, log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no ptxas log for {name} {meta}: {log[-500:]!r}")
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs.group(1)), "spill_bytes": sum(spills)}


def sass_mix(name: str, meta: dict, options: dict, runtime: dict | None = None) -> dict:
    """SASS instruction mix of one configuration compiled for sm_90 (specialised for ``runtime`` argument
    values if given): registers, spills, whole-kernel totals by opcode class and, for each loop (a backward
    branch to an earlier label), the mix of its body (target label to branch; an inner loop's instructions
    count in its outer loop too). No GPU: the cubin is disassembled offline."""
    kernel, log = _compile(name, meta, options, runtime)
    (fn,) = parse_sass(disassemble(kernel.asm["cubin"]))  # one kernel per cubin
    opcodes = fn.opcodes
    loops = [{"label": label, "first": first, "last": last, **sass_count(opcodes[first:last + 1])}
             for label, first, last in fn.loops]
    return {"kernel": name, **meta, **options, **_ptxas_facts(name, meta, log), "runtime": bool(runtime),
            "whole": sass_count(opcodes), "loops": loops}


def _compile_packed(config):
    return compile_one(*config)


def probe() -> None:
    """Compile a trivial kernel for sm_90: raises if this machine cannot compile offline at all."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    triton.compile(ASTSource(fn=_copy, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                             constexprs={(2,): 32}), target=GPUTarget("cuda", ARCH, 32))


def main(argv: list[str]) -> int:
    if "--probe" in argv:
        probe()
        return 0
    if "--sass" in argv:
        names = [a for a in argv if a.startswith("_")]  # kernel names: only those (default all)
        for config in configurations([CUB_SHAPE]):
            if not names or config[0] in names:
                print(json.dumps(sass_mix(*config, CUB_RUNTIME if "--runtime" in argv else None)), flush=True)
        return 0
    if "--all" in argv:
        from protokern.kernels import prototype_distance as K

        configs = K.launch_configs()
    else:
        configs = configurations(SHAPES)
    spilled = False
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(_compile_packed, configs):
            print(json.dumps(result), flush=True)
            spilled |= result["spill_bytes"] > 0
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
