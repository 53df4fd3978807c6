"""CPU gates for the CUDA kernels (csrc/), so that blind GPU work fails here rather than on the device.

* ptxas gate: the launchers' translation units (csrc/forward.cu, csrc/backward.cu) compiled for sm_90 with
  ``-Xptxas -v``: every kernel variant (forward: 3 searches x 2 z layouts x streaming / p-resident plan;
  the one-launch backward) has 0 spill bytes, registers that let its launch-bounds blocks be
  resident, and shared memory x resident blocks within the SM's 228 KB (227 KB per block + 1 KB reserved
  each). Needs nvcc (skips without it). Prints the table.
* The CPU emulator (csrc/emu) built with ThreadSanitizer, and with AddressSanitizer + UBSan, running the
  CUB-shape tile configuration and the tail cases (csrc/emu/sanitize_main.cpp). Needs g++ >= 11 and the
  sanitizer runtimes (skips without them, except under PROTOKERN_REQUIRE_SANITIZERS=1, which .ci/run sets: there
  it fails). ASan warns that it does not fully support swapcontext (the
  emulator's fibers); it has reported nothing here.
Not GPU tests: they run in CI on the CPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sanitizer_jobs import SANITIZERS
from tests.sanitizer_jobs import gxx_ok as _gxx_ok

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
EMU = CSRC / "emu"

SM90_REGS = 65536          # 32-bit registers per SM
SM90_SMEM_SM = 228 * 1024  # shared memory per SM, bytes
SM90_SMEM_BLOCK = 227 * 1024
SM90_SMEM_RESERVED = 1024  # per resident block


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def kernel_table(tmp: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (threads, min blocks per SM, max dynamic shared memory bytes), from the kernel headers
    (csrc/emu/harness.cpp: emu_kernel_table), i.e. the numbers the launchers use."""
    sys.path.insert(0, str(EMU))
    try:
        import check  # csrc/emu/check.py
    finally:
        sys.path.remove(str(EMU))
    lib = check.build(tmp)
    buf = ctypes.create_string_buffer(4096)
    lib.emu_kernel_table(buf, len(buf))
    table = {}
    for line in buf.value.decode().splitlines():
        name, threads, blocks, smem = line.rsplit(" ", 3)
        table[name] = (int(threads), int(blocks), int(smem))
    return table


_COMPILED: dict[tuple[str, Path], tuple[dict[str, dict[str, int]], bytes]] = {}  # one nvcc run per source and session


def ptxas_report(nvcc: str, source: Path, tmp: Path) -> dict[str, dict[str, int]]:
    """Demangled kernel name -> {registers, spill_stores, spill_loads, static_smem} from ptxas -v; the cubin
    is written to tmp/<stem>.cubin. Compiled once per source and test session (the ptxas gate and
    tests/cuda_sass.py read the same compile)."""
    cubin = tmp / (source.stem + ".cubin")
    if (nvcc, source) not in _COMPILED:
        report = _ptxas_compile(nvcc, source, cubin)
        _COMPILED[nvcc, source] = (report, cubin.read_bytes())
    report, data = _COMPILED[nvcc, source]
    if not cubin.exists():
        cubin.write_bytes(data)
    return {name: dict(facts) for name, facts in report.items()}


def _ptxas_compile(nvcc: str, source: Path, cubin: Path) -> dict[str, dict[str, int]]:
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}"]
    cmd = [nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v",
           *incs, str(source), "-o", str(cubin)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    text = subprocess.run(["c++filt"], input=out.stderr, capture_output=True, text=True).stdout \
        if shutil.which("c++filt") else out.stderr
    report, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (.+)$", line)
        if m:
            current = m.group(1).strip()
            report[current] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "static_smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            report[current]["spill_stores"], report[current]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            report[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            report[current]["static_smem"] = int(s.group(1)) if s else 0
    return report


def _short(name: str) -> str:
    """'void protokern::(anonymous namespace)::forward_kernel<3, protokern::(anonymous namespace)::
    MmaSearch<true>, false>(protokern::ForwardParams, int)' -> 'forward_kernel<3, MmaSearch<true>, false>'."""
    name = name.replace("protokern::(anonymous namespace)::", "").replace("protokern::", "")
    name = re.sub(r"^void ", "", name)
    name = name[: name.rindex("(")] if "(" in name else name
    return name.replace(" >", ">")


def test_ptxas_gate(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (CUDA toolkit)")
    if (why := _gxx_ok()) is not None:
        pytest.skip(why)
    table = kernel_table(tmp_path)
    report = {}
    for source in ("forward.cu", "backward.cu"):
        report.update({_short(k): v for k, v in ptxas_report(nvcc, CSRC / source, tmp_path).items()})
    rows, problems = [], []
    for name, (threads, blocks, smem) in table.items():
        assert name in report, f"ptxas compiled no {name}; it compiled {sorted(report)}"
        r = report[name]
        regs_per_block = -(-r["registers"] // 8) * 8 * threads
        reg_blocks = SM90_REGS // regs_per_block if regs_per_block else 99
        smem_block = smem + r["static_smem"]
        smem_total = blocks * (smem_block + SM90_SMEM_RESERVED)
        rows.append(f"{name:48} {threads:7} {blocks:6} {r['registers']:4} {reg_blocks:9} "
                    f"{r['spill_stores'] + r['spill_loads']:6} {smem_block:10} {smem_total:12}")
        if r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{name}: {r['spill_stores']} bytes spill stores, {r['spill_loads']} bytes spill loads")
        if reg_blocks < blocks:
            problems.append(f"{name}: {r['registers']} registers allow {reg_blocks} blocks/SM, launch bounds say {blocks}")
        if smem_block > SM90_SMEM_BLOCK or smem_total > SM90_SMEM_SM:
            problems.append(f"{name}: {blocks} blocks x {smem_block} B shared memory exceed the SM")
    print("\nkernel (sm_90)                                   threads blocks regs reg-blocks spills smem/block smem/SM")
    print("\n".join(rows))
    assert not problems, "\n".join(problems)


@pytest.mark.xdist_group("emulator")  # beside test_kernels_on_cpu_emulator: one start of the sanitizer jobs
@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_emulator_under_sanitizer(sanitizer_jobs, sanitizer):
    """The emulated kernels race-free (TSan) and memory/UB-clean (ASan + UBSan) on the CUB tile
    configuration and the tails; the driver also checks the results (csrc/emu/sanitize_main.cpp). The CUDA
    threads are fibers that TSan tracks as such: only barriers order them, so a missing __syncthreads is a
    reported race (checked by hand: removing the forward's end-of-stage barrier, or grad_p's barrier before its
    double buffer is refilled, is reported). Both builds run in the background from the first test that asks
    for them (tests/sanitizer_jobs.py): about 4 minutes of one core each (TSan mostly running, ASan + UBSan
    mostly compiling)."""
    # CI sets PROTOKERN_REQUIRE_SANITIZERS=1: there a missing compiler or runtime fails instead of skipping (an
    # out-of-bounds read with a right result, caught only by ASan, would pass unseen)
    missing = pytest.fail if os.environ.get("PROTOKERN_REQUIRE_SANITIZERS") == "1" else pytest.skip
    if (why := _gxx_ok()) is not None:
        missing(why)
    built, run = sanitizer_jobs[sanitizer].result()
    if built.returncode != 0 and re.search(r"cannot find -l(tsan|asan|ubsan)|libtsan|libasan", built.stderr):
        missing(f"no {sanitizer} sanitizer runtime: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr[-3000:]
    print(run.stdout[-2000:])
    assert run.returncode == 0 and "all checks passed" in run.stdout, (
        f"exit status {run.returncode}\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-6000:]}")


def test_cuda_sass_phases(tmp_path):
    """tests/cuda_sass.py (the static issue budget): every phase of every kernel variant is found in the SASS
    with instructions (the phase anchors still match the source), the MMA search step holds what the source
    implies (per 32-channel stage 32 HMMA for TF32, 96 for 3xTF32: 4 k8 steps x 4 n8 tiles x 2 m16 tiles,
    x 3 for the split; 1024 FFMA for the FFMA search: 8 x 4 accumulators x 32 channels) and no other phase
    has an HMMA; the certification's separable form is charged and cheaper than its per-pair form; the model's
    constants match forward.cuh; the budget at the CUB shape is positive and puts
    the search's share where the source says (FFMA's search is its largest phase)."""
    from tests import cuda_sass

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (CUDA toolkit)")
    if (why := _gxx_ok()) is not None:  # the launch shapes come from the launchers through the emulator build
        pytest.skip(why)
    source = (CSRC / "forward.cuh").read_text()
    for name in ("kBM", "kBK", "kDC", "kRescoreBatch"):
        assert re.search(rf"constexpr int {name} = {getattr(cuda_sass, name)};", source), name
    kernels = cuda_sass.compile_kernels(tmp_path)
    forward_phases = {p for p, _ in cuda_sass.FORWARD_PHASES if p}
    backward_phases = {p for p, _ in cuda_sass.BACKWARD_PHASES if p}
    forwards = [k for k in kernels if k.startswith("forward_kernel<")]
    assert len(forwards) == 22, sorted(kernels)  # 3 searches x 4 z copy paths (no FFMA kZDense) x 2 plans
    for name in forwards:
        _, ph, _ = kernels[name]
        assert forward_phases <= set(ph), (name, forward_phases - set(ph))
        assert all(ph[p].hot > 0 for p in forward_phases), name
        hmma = {p: c.count("HMMA") for p, c in ph.items() if c.count("HMMA")}
        if "MmaSearch" in name and name != "forward_kernel<2, MmaSearch<false>, true>":
            # all four n8 tiles, no test per tile: no WARPSYNC before each tile's MMAs (forward.cuh, kTileTests)
            assert ph["search"].count("WARPSYNC") <= 1, (name, ph["search"].opcodes)
        if "MmaSearch<false>" in name:
            assert hmma == {"search": 32}, (name, hmma)
        elif "MmaSearch<true>" in name:
            assert hmma == {"search": 96}, (name, hmma)
        else:
            assert hmma == {} and ph["search"].count("FFMA") == 1024, (name, hmma, ph["search"].count("FFMA"))
        # the certification's two forms (forward.cuh): each visit takes one min per pair of the thread (32), the
        # per-pair form in its own phase (rare: not charged), and the separable form costs under 3/4 of it
        sep, per_pair = ph["(1) threshold"], ph["(1) threshold, per-pair form"]
        assert per_pair.count("FMNMX") == 32 and sep.count("FMNMX") >= 32, (name, sep.opcodes, per_pair.opcodes)
        assert sep.hot < 0.75 * per_pair.hot, (name, sep.hot, per_pair.hot)
        # the pipeline advances its stage indices by carries (no integer division: I2F.RP + MUFU.RCP) and
        # issues only its own z path's copies, unrolled (a loop the model counts once): 8 four-byte ones per
        # thread (kZCols4, kZChans4) or 2 sixteen-byte ones (kZCols16, kZDense); the streaming plan adds p's 4
        # sixteen-byte copies, whole chunks (no ZFILL address arithmetic), and its 4-byte fallback is a loop of
        # its own phase (p's alignment is a run-time choice; the model does not charge it)
        pipe = ph["pipeline"]
        assert pipe.count("I2F") == pipe.count("MUFU") == 0, (name, pipe.opcodes)
        zc = int(name[len("forward_kernel<"):].split(",")[0])
        wide = pipe.count("LDGSTS.E.BYPASS.128")
        copies = (wide, pipe.count("LDGSTS") - wide)
        z_copies = (0, 8) if zc in (0, 1) else (2, 0)
        streaming = name.endswith(", false>")
        p_copies = (4, 0) if streaming else (0, 0)
        assert copies == (z_copies[0] + p_copies[0], z_copies[1] + p_copies[1]), (name, copies)
        # 16-byte copies are whole chunks or none (zero-fill by predicate: no ZFILL address arithmetic); the z
        # paths' partial chunks (D % 4 != 0 dense, HW % 4 != 0 padded rows) are a phase of their own
        assert pipe.count("LDGSTS.E.BYPASS.128.ZFILL") == 0, (name, pipe.opcodes)
        partial = ph.get("pipeline, z partial")
        assert (partial.count("LDGSTS.E.BYPASS.128.ZFILL") if partial else 0) == z_copies[0], (name, partial)
        fallback = ph.get("pipeline, p fallback")
        if streaming:
            # a loop (ptxas may unroll it by 2)
            assert fallback is not None and 0 < fallback.count("LDGSTS") <= 2 and fallback.loop, (name, fallback)
            # the p copies' addresses: no row products per stage (v12: 39 instructions for the 4, from 94)
            assert pipe.hot < 190, (name, pipe.hot)
        else:
            assert fallback is None, name
    _, ph, _ = kernels["backward_kernel"]
    assert backward_phases <= set(ph) and all(ph[p].hot > 0 for p in backward_phases), set(ph)
    cand = {"per_bm": 1.0, "per_warp_tile": 16.0, "batches": 2.0, "write_iters": 1.0}
    _, ffma, _ = kernels["forward_kernel<0, FfmaSearch, true>"]
    per_tile = cuda_sass.forward_per_tile(ffma, cuda_sass.CUB, cand)
    assert min(per_tile.values()) > 0 and max(per_tile, key=per_tile.get) == "search", per_tile
    # issue 9's budget for the certified rescoring: < 50 warp-instructions per candidate in the p-resident plan at
    # the CUB shape (17 candidates per warp and tile in 2.66 rounds of 8 on average: what "high" gives on uniform
    # features, test_cuda_sass_candidates' emulator statistics)
    cand = {"per_bm": 1.06, "per_warp_tile": 17.0, "batches": 2.66, "write_iters": 1.0}
    for name in forwards:
        if name.endswith(", true>"):
            per_tile = cuda_sass.forward_per_tile(kernels[name][1], cuda_sass.CUB, cand)
            assert cuda_sass.rescoring_per_candidate(per_tile, cand) < 50, (name, per_tile)
    bw = cuda_sass.backward_per_warp(ph, cuda_sass.CUB)
    assert bw["launch"] == {"G": 1, "KT": 49, "passes": 1, "chunks": 8, "NB": 5, "stages": 16, "parts": 3,
                            "gz_blocks": 320, "gp_first": 0, "gp_blocks": 384}
    # grad_p's image parts: each block's store and count, and the sum of the parts (charged a third a block)
    assert 0 < bw["grad_p"]["grad_p parts sum"] < bw["grad_p"]["grad_p parts"], bw["grad_p"]
    # the CUB shape's grad_p stages z by 16-byte copies only; grad_z's pair updates read a table, no shuffles
    issue_z = ph["grad_p issue z"]
    assert 0 < issue_z.count("LDGSTS.E.BYPASS.128") == issue_z.count("LDGSTS"), issue_z.opcodes
    # its walker keeps each thread's copy offsets across images and stages: no integer division (I2F + MUFU)
    assert issue_z.count("I2F") == issue_z.count("MUFU") == 0, issue_z.opcodes
    assert ph["grad_z pair"].count("SHFL") == 0 and ph["grad_z pair"].count("LDS.64") > 0
    # at one pass every prototype of a chunk wins in it: its pair updates carry no per-pair test (8 instructions:
    # LDS.64, 2 IADD, 2 LDS, FADD, FFMA, STS; v7's tested updates cost 10)
    pairs = bw["launch"]["G"] * bw["launch"]["chunks"] * 32
    assert bw["grad_z"]["grad_z pair"] <= 8.5 * pairs, (bw["grad_z"]["grad_z pair"] / pairs, ph["grad_z pair"].opcodes)
    assert min(bw["grad_z"].values()) > 0 and min(bw["grad_p"].values()) > 0
    # at (32, 512, 28x28, 2000) grad_z sorts the image's winners by patch once per block: its walk issues < 13
    # instructions per winner (LDS.64 of {k m, g}, the p row's address and load, FADD, FFMA, the patch test; the
    # tail batch and the patch changes apart), and the block is under a third of the scanning plan's, whose 14
    # passes each re-read every prototype's (k, g) (249 -> 44 us of issue floor by this model)
    big = {"B": 32, "D": 512, "HW": 784, "M": 2000}
    bw_big = cuda_sass.backward_per_warp(ph, big)
    assert (bw_big["launch"]["KT"], bw_big["launch"]["passes"]) == (200, 4), bw_big["launch"]
    assert bw_big["grad_z"]["grad_zs walk"] < 13 * big["M"] / 8, (bw_big["grad_z"], ph["grad_zs walk"].loop)
    scanning = cuda_sass.scanning_per_warp(ph, big, KT=56, seg=256)
    assert sum(bw_big["grad_z"].values()) < sum(scanning.values()) / 3, (bw_big["grad_z"], scanning)
    assert cuda_sass.forward_launch(cuda_sass.CUB, 132) == (True, 5, 256)  # forward.cuh forward_launch
    # the CUB launch (NCHW 7x7 z, 16-byte aligned) stages z densely at "high" and "medium" (16-byte copies only,
    # asserted above for kZDense), by 4-byte copies at "highest"; the budget counts those variants
    assert [cuda_sass.forward_z_copy(cuda_sass.CUB, q) for q in ("highest", "high", "medium")] == [0, 3, 3]
    # --stalls: a device's ncu source page of this build, by phase. A synthetic page: one sample per HMMA (all in
    # the search), 2 per LDG with a long-scoreboard reason; a page of other SASS is refused
    fn, _, _ = kernels["forward_kernel<3, MmaSearch<true>, true>"]
    cols = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
            "L1 Wavefronts Shared Excessive", "stall_long_sb", "stall_math"]
    rows = [[hex(16 * i), f"  @P0 {op} R0, R1 ;" if i % 2 else f"  {op} R0, R1 ;",
             "1" if op.startswith("HMMA") else "2" if op.startswith("LDG") else "0", "7", "0",
             "2" if op.startswith("LDG") else "0", "1" if op.startswith("HMMA") else "0"]
            for i, op in enumerate(fn.opcodes)]
    text = "\n".join([f'"Kernel Name","{fn.name}",', ",".join(f'"{c}"' for c in cols)]
                     + [",".join(f'"{v}"' for v in r) for r in rows])
    (page,) = cuda_sass.ncu_source_pages(text).values()
    header, table, inner = cuda_sass.SOURCES["forward.cu"]
    lines, inner_lines = cuda_sass.phase_lines(CSRC / header, table), cuda_sass.inner_lines(CSRC / header, inner)
    ph = cuda_sass.stall_phases(fn, header, lines, page, inner_lines)
    n_hmma, n_ldg = (sum(op.startswith(x) for op in fn.opcodes) for x in ("HMMA", "LDG"))
    assert abs(sum(p["share"] for p in ph.values()) - 1) < 1e-9
    assert sum(p["executed"] for p in ph.values()) == 7 * len(rows)
    assert ph["search"]["samples"] >= n_hmma and ph["search"]["math"] > 0
    assert sum(p["samples"] for p in ph.values()) == n_hmma + 2 * n_ldg
    with pytest.raises(ValueError, match="not this build"):
        cuda_sass.stall_phases(fn, header, lines, page[:-1], inner_lines)


def test_cuda_sass_candidates():
    """The budget's candidate counts from the emulator: every (b, m) has at least its winner, and the TF32
    search's looser bound gives more candidates than FFMA's."""
    from tests import cuda_sass

    if (why := _gxx_ok()) is not None:
        pytest.skip(why)
    fp32 = cuda_sass.candidate_stats("highest", B=2, M=128)
    tf32 = cuda_sass.candidate_stats("medium", B=2, M=128)
    assert 1.0 <= fp32["per_bm"] < tf32["per_bm"], (fp32, tf32)
    assert fp32["batches"] >= fp32["per_warp_tile"] / cuda_sass.kRescoreBatch and 1.0 <= fp32["write_iters"] <= 32


def test_the_separable_limit_is_the_same_in_both_derivations():
    """The cuda kernel's own bound (csrc/forward.cuh) and search_bound's share the limit under which the
    separable form applies: tests of the torch and Triton rule then speak for the cuda one's range too."""
    from protokern.kernels import search_bound

    source = (CSRC / "forward.cuh").read_text()
    limit = re.search(r"constexpr float kSeparableMaxNorm2 = (0x[0-9a-fp.+-]+)f;", source)
    assert limit is not None and float.fromhex(limit.group(1)) == search_bound.SEPARABLE_MAX_NORM2
