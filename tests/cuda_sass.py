"""Static issue budget of the CUDA kernels (csrc/, issue 9), offline for sm_90, no GPU.

``python -m tests.cuda_sass [--json] [--shape B,D,HW,M]`` (default: the CUB shape) compiles csrc/forward.cu
and csrc/backward.cu for sm_90 with -lineinfo (the ptxas gate's command:
tests/test_cuda_gates.py::ptxas_report), disassembles the cubins with
``nvdisasm -gi`` (source line and inline stack of every SASS instruction; parsing shared with
tests/kernels/sm90_gate.py in tests/sass.py) and sums the instructions of each kernel variant by phase:

* forward_kernel: prologue, pipeline (the loop's copies, waits and index math; its instructions outside every
  loop are "pipeline setup", once per block; its rare copy paths are phases of their own, FORWARD_INNER, not
  charged), the search step, norms,
  (1) threshold (visit + reduction), (2) flags, (3) rescoring (compaction of the flags into a list, and per
  round of 8 candidates: entry, exact distance set-up and butterfly, channel loop, partial chunk, fold), outputs;
* backward_kernel: grad_z pass set-up, clear, stage z, chunk overhead, per-pair update, sum + write (the
  scanning plan); grad_zs load, count, scan, scatter, stage, walk, flush, write (the sorted plan of maps that
  need several scanning passes); grad_p set-up, stage loop, issue z, issue (g, k), per-image update, store,
  image parts (each block's partial sums and count; the tile's last block's sum of the parts).

An instruction belongs to the phase of the outermost frame of its inline stack that lies in a phase's source
range (a phase runs from its anchor line in the source to the next anchor), so code inlined from helpers
(the searches' visit) counts in the phase that calls it. Per phase: the static
mix and its clean loops (back-edge loops all of whose instructions are in the phase).

Then ``budget``: executed warp-instructions at a shape = static per-phase counts x how often each phase runs
per warp (stages per tile, rescoring batches from the candidates per (b, m), loop trips) x warps x blocks,
and an issue floor for an H200 (132 SMs x 4 schedulers x 1 warp-instruction per cycle at ~1.98 GHz). A
model, not a measurement: branches inside a phase count as if every instruction issued (an upper bound,
e.g. the FFMA search's warps that hold only padding skip its math; a tile's carries in the pipeline run once
per tile, not per stage).

``python -m tests.cuda_sass --stalls stalls-sass.csv.gz`` puts a measurement beside the model: a device's ncu
source page (benchmarks/gpu_check.sh, step stalls; warp-stall samples per SASS instruction) of kernels built
from the same sources, by the same phases (stall_phases; the SASS must match this build's opcode by opcode).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.sass import Function, disassemble, parse_sass

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"

# (phase, anchor): a phase starts at the first line after the previous anchor's that contains its anchor
# text, and runs to the line before the next anchor. A phase of None is transparent (the frame is skipped
# for an inner one). The last anchor ends the table.
FORWARD_PHASES = [
    ("prologue", "forward_kernel(const ForwardParams prm"),
    ("pipeline", "for (int it = 0; it < n_iter; ++it) {"),
    ("clear", "if (ds == 0) search.clear();"),
    ("search", "search.template step<kPs, kTileTests, kInterleave>"),
    ("norms", "if (tid < kBK) {  // channels in order"),
    ("(1) threshold", "float* const red = kResident ? smem + P::kScratch : st;"),
    ("(2) flags", "// (2) candidates"),
    ("(3) compact", "// (3) exact rescoring"),
    ("(3) round", "for (int c0 = 0; c0 < n; c0 += kRescoreBatch) {"),
    ("(3) exact_distance", "// Exact e = sum_d (z[d] - p[d])^2 in fp32"),
    ("(3) channel loop", "auto add_chunk = [&](int t, const float (&zv)[8]) {"),
    ("(3) tail", "const int d = 8 * s + 32 * chunks;"),
    ("(3) exact_distance", "e += __shfl_xor_sync(kFullMask, e, o);"),
    ("(3) fold", "// Fold: the group's first lane takes best[ml]"),
    ("(3) compact", "__syncwarp();  // every lane is done reading the list"),
    ("outputs", "__syncthreads();  // this buffer is refilled"),
    (None, "// Launch shape of the forward"),
]
BACKWARD_PHASES = [
    ("grad_z pass", "void grad_z_block("),
    ("grad_z clear", "for (int i = lane; i < rows * kAccStride; i += 32)"),
    ("grad_z stage z", "for (int e = threadIdx.x; e < rows * 32; e += kBwThreads) {"),
    ("grad_z pass", "Chunk next[G];"),
    ("grad_z chunk", "for (int c0 = m_begin; c0 < m_end; c0 += 32) {"),
    ("grad_z rows, partial", "} else {  // some of the 16 rows are not needed"),
    ("grad_z chunk", "const unsigned bits = (in_pass[gi] >> h) & 0xffffu;"),
    ("grad_z pair", "auto updates = [&](unsigned use) {"),
    ("grad_z pair, partial", "} else {  // some of the 16 prototypes win outside the pass"),
    ("grad_z chunk", "__syncthreads();"),
    ("grad_z sum + write", "// Sum the warps' accumulators"),
    (None, "unsigned match_any(int v) {"),
    ("grad_zs load", "void grad_z_sorted_block("),
    ("grad_zs count", "// (2) counts per warp and patch"),
    ("grad_zs scan", "// (3) the scan"),
    ("grad_zs scatter", "// (4) the scatter"),
    ("grad_zs stage", "for (int k0 = 0; k0 < HW; k0 += KT) {"),
    ("grad_zs walk", "const int ka = min(k0 + w * per_warp"),
    ("grad_zs flush", "if (k != kc) {  // warp-uniform"),
    ("grad_zs walk", "acc = fmaf(en.g, zc - pe, acc);"),
    (None, "for (int j = 0; j < kGsBatch; ++j) visit(en[j], pe[j]);"),  # the visit's own lines tell
    ("grad_zs walk", "for (; e < e_end; ++e) {"),
    ("grad_zs write", "// Write the tile out"),
    (None, "// x, hidden from the optimiser"),
    ("grad_p setup", "void grad_p_block("),
    ("grad_p issue z", "auto issue = [&](int bs, int buf) {"),
    ("grad_p issue g, k", "async_commit();"),
    (None, "issue(b_begin, 0);"),  # the issue lambda's calls: its own lines tell the phase
    ("grad_p stage", "for (int si = 0, bs = b_begin;"),
    (None, "issue(bs + NB, buf ^ 1);"),
    ("grad_p stage", "async_wait<1>();"),
    ("grad_p image", "for (int bl = 0; bl < nb; ++bl) {"),
    (None, "if (more) store_gk(next, buf ^ 1);"),  # the next stage's (g, k): store_gk's own lines tell
    ("grad_p stage", "__syncthreads();  // buffer buf"),
    ("grad_p store", "const int mw = opaque("),
    # the image parts: each block's partial sums and count, then the last block's sum of the parts
    ("grad_p parts", "if (l.gp_parts > 1) {"),
    ("grad_p parts sum", "// The parts in increasing order"),
    ("grad_p store", "if (m < M && d_ok) prm.grad_p[(int64_t)m * D + d] = 2.f * acc[j];"),
    (None, "__global__ void __launch_bounds__(kBwThreads"),
    # the two-image instance of grad_z_block (maps of HW <= 30; the CUB shape's blocks hold one image)
    ("grad_z two images", "grad_z_block<kGzGroup>(prm"),
    (None, "return;"),
    # the NHWC and 4-byte / gathered instances of grad_p_block (the CUB shape's NCHW z takes neither)
    ("grad_p other layouts", "grad_p_block<kGpNhwc>(prm"),
    (None, "inline BackwardLaunch backward_launch("),
]
# (phase, outer phase, first anchor, end anchor): code of the lines from the first anchor's to the line before the
# end anchor's, inlined where the outer phase calls it, counts in `phase` instead (rare paths a phase's calls
# inline, which the model does not charge)
FORWARD_INNER = [
    # the p-resident plan's p copies, during a block's first patch tile only (the issue lambda's, in the prologue's
    # lines; 4 x 39 instructions per warp and block: not charged)
    ("pipeline, p first tile", "pipeline", "} else if (s.b == b0 && s.k0 == 0) {", "issue_z(s, buf);"),
    # the streaming plan's 4-byte p copies, for D % 4 != 0 or unaligned p (the copy_p lambda's)
    ("pipeline, p fallback", "pipeline", "} else {  // warp w copies prototypes w + 8 i", "// Start the copy of step s"),
    # the z copies' partial chunks (dense path: D % 4 != 0; 16-byte path: HW % 4 != 0, padded rows)
    ("pipeline, z partial", "pipeline", "} else {  // z partial chunks (D % 4 != 0)", "} else if constexpr (kZ == kZCols16) {"),
    ("pipeline, z partial", "pipeline", "} else {  // z partial chunks (HW % 4 != 0", "} else {  // 4-byte copies"),
    # the certification's per-pair form, for tiles with a norm above 2^100 or not finite (the separable form's
    # limit: forward.cuh)
    ("(1) threshold, per-pair form", "(1) threshold", "if (tid == 0) emu::per_pair_tiles.fetch_add(1);",
     "red[Search::entry(tid) * kBM + Search::slot_ml(tid, s)] = tmin[s];"),
]
SOURCES = {"forward.cu": ("forward.cuh", FORWARD_PHASES, FORWARD_INNER),
           "backward.cu": ("backward.cuh", BACKWARD_PHASES, [])}


def phase_lines(path: Path, table: list[tuple[str | None, str]]) -> dict[int, str | None]:
    """Source line -> phase (None: transparent) of the lines a phase table covers; raises if an anchor is
    missing (the source changed: update the table)."""
    lines = path.read_text().splitlines()
    starts, at = [], 0
    for phase, anchor in table:
        hit = next((i for i in range(at, len(lines)) if anchor in lines[i]), None)
        if hit is None:
            raise ValueError(f"{path.name}: no line with {anchor!r} after line {at + 1}")
        starts.append((hit + 1, phase))
        at = hit + 1
    out = {}
    for (first, phase), (nxt, _) in zip(starts, starts[1:] + [(len(lines) + 1, None)]):
        if nxt == len(lines) + 1 and phase is None and (first, phase) == starts[-1]:
            break  # the closing anchor
        out.update({line: phase for line in range(first, nxt)})
    return out


def inner_lines(path: Path, table: list[tuple[str, str, str, str]]) -> dict[int, tuple[str, str]]:
    """Source line -> (phase, outer phase) of an inner table's ranges (FORWARD_INNER); raises if an anchor is missing."""
    lines = path.read_text().splitlines()
    out = {}
    for phase, outer, first, end in table:
        a = next((i for i, text in enumerate(lines) if first in text), None)
        b = next((i for i in range(a + 1, len(lines)) if end in lines[i]), None) if a is not None else None
        if a is None or b is None:
            raise ValueError(f"{path.name}: no lines from {first!r} to {end!r}")
        out.update({line: (phase, outer) for line in range(a + 1, b + 1)})
    return out


def phase_of(stack, file: str, lines: dict[int, str | None], inner: dict[int, tuple[str, str]] | None = None) -> str:
    """The phase of an instruction: its outermost non-transparent frame in `file` that a phase covers, unless
    a frame inside it lies in an inner range of that phase (FORWARD_INNER)."""
    for i, (f, line) in enumerate(stack):
        if f == file and lines.get(line) is not None:
            for g, inner_line in stack[i + 1:]:
                if g == file and inner and inner.get(inner_line, (None, None))[1] == lines[line]:
                    return inner[inner_line][0]
            return lines[line]
    return "other"


@dataclass
class PhaseCount:
    """One phase of a kernel: ``static`` all its instructions; ``opcodes`` its hot ones (Function.hot: not
    the divergent-warp fallbacks nor slow-path subroutines); ``loop`` the hot opcodes of the phase that lie
    in its loops (back edges whose hot instructions are mostly, > 80%, of the phase); ``nest`` each such loop
    (first and last instruction, its hot opcodes of the phase)."""
    static: int
    opcodes: list[str]
    loop: list[str] = field(default_factory=list)
    nest: list[tuple[int, int, list[str]]] = field(default_factory=list)  # each loop: (first, last, hot opcodes)

    @property
    def hot(self) -> int:
        return len(self.opcodes)

    def count(self, prefix: str, within: list[str] | None = None) -> int:
        """Instructions whose opcode starts with ``prefix`` (e.g. "HMMA", "LDG", "FFMA"), of the phase or
        of ``within``."""
        return sum(op.startswith(prefix) for op in (self.opcodes if within is None else within))

    def executed(self, runs: float = 1.0, marker: str | None = None, per_iter: float = 1.0,
                 iters: float = 0.0) -> float:
        """Instructions one warp issues for ``runs`` executions of the phase. Without ``marker``: every hot
        instruction once per run. With it, the phase is a loop of ``iters`` source iterations per run, each
        holding ``per_iter`` instructions of opcode ``marker``: an iteration costs the loop's instructions /
        its markers x per_iter (unrolling cancels; with no loop, the phase's), copies of the iteration outside
        the loop (peeled or remainder iterations, counted by their markers) are not charged, and what is
        left (set-up, reductions after the loop) runs once per run."""
        if marker is None:
            return self.hot * runs
        body = self.loop or self.opcodes
        in_body, total = self.count(marker, body), self.count(marker)
        if in_body == 0:
            raise ValueError(f"no {marker} in the phase's loop: update the budget model")
        cost = len(body) * per_iter / in_body
        rest = self.hot - len(body) - (total - in_body) / per_iter * cost if self.loop else 0.0
        return runs * (max(0.0, rest) + cost * iters)

    def nested(self, runs: float, marker: str, outer_iters: float, inner_iters: float) -> float:
        """Instructions one warp issues for ``runs`` executions of a phase whose every copy (e.g. a lambda inlined
        twice) is an outer loop around an inner loop holding ``marker``: per run ``outer_iters`` outer iterations
        of ``inner_iters`` inner ones each; the phase's instructions outside its loops are split evenly between
        its copies and run once per run."""
        def inside(a, b):
            return a is not b and b[0] <= a[0] and a[1] <= b[1]
        inner = [r for r in self.nest if any(op.startswith(marker) for op in r[2])
                 and not any(inside(o, r) for o in self.nest)]
        if not inner:
            raise ValueError(f"no innermost loop with {marker} in the phase: update the budget model")
        outer = [o for o in self.nest if inside(inner[0], o)]
        if not outer:
            raise ValueError("the phase's inner loop has no outer loop: update the budget model")
        enclosing = min(outer, key=lambda o: o[1] - o[0])
        rest = (self.hot - len(self.loop)) / len(inner)
        return runs * (rest + outer_iters * (len(enclosing[2]) - len(inner[0][2]) + inner_iters * len(inner[0][2])))


def phase_tags(fn: Function, file: str, lines: dict[int, str | None],
               inner: dict[int, tuple[str, str]] | None = None) -> list[str]:
    """The phase of each of ``fn``'s instructions (phase_of), the forward's pipeline instructions outside every
    loop being "pipeline setup": hoisted by the compiler before the main loop, run once per block (charged like
    the prologue)."""
    tags = [phase_of(stack, file, lines, inner) for stack in fn.stacks]
    in_any_loop = set()
    for _, first, last in fn.loops:
        in_any_loop.update(range(first, last + 1))
    return [t + " setup" if t == "pipeline" and i not in in_any_loop else t for i, t in enumerate(tags)]


def phases(fn: Function, file: str, lines: dict[int, str | None],
           inner: dict[int, tuple[str, str]] | None = None) -> dict[str, PhaseCount]:
    """Per phase of a kernel function: static and hot instructions and its loops."""
    tags = phase_tags(fn, file, lines, inner)
    hot = fn.hot()
    out: dict[str, PhaseCount] = {}
    for op, tag, h in zip(fn.opcodes, tags, hot):
        pc = out.setdefault(tag, PhaseCount(0, []))
        pc.static += 1
        if h:
            pc.opcodes.append(op)
    in_loop: dict[str, set[int]] = {}
    for _, first, last in fn.loops:
        hot_tags = [t for t, h in zip(tags[first:last + 1], hot[first:last + 1]) if h]
        top = max(set(hot_tags), key=hot_tags.count) if hot_tags else None
        if top is not None and hot_tags.count(top) > 0.8 * len(hot_tags):
            members = [i for i in range(first, last + 1) if hot[i] and tags[i] == top]
            in_loop.setdefault(top, set()).update(members)
            out[top].nest.append((first, last, [fn.opcodes[i] for i in members]))
    for tag, members in in_loop.items():
        out[tag].loop = [fn.opcodes[i] for i in sorted(members)]
    return out


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def compile_kernels(tmp: Path) -> dict[str, tuple[Function, dict[str, PhaseCount], dict]]:
    """Short kernel name (tests/test_cuda_gates.py::_short) -> (SASS function, phases, ptxas facts) of every
    kernel in csrc/forward.cu and csrc/backward.cu compiled for sm_90. Raises without nvcc."""
    from tests.test_cuda_gates import _nvcc, _short, ptxas_report

    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("needs nvcc (CUDA toolkit)")
    out = {}
    for source, (header, table, inner_table) in SOURCES.items():
        facts = {_short(k): v for k, v in ptxas_report(nvcc, CSRC / source, tmp).items()}
        lines = phase_lines(CSRC / header, table)
        inner = inner_lines(CSRC / header, inner_table)
        cubin = (tmp / (Path(source).stem + ".cubin")).read_bytes()
        funcs = parse_sass(disassemble(cubin, line_info=True))
        for fn, name in zip(funcs, demangle([f.name for f in funcs])):
            short = _short(name)
            out[short] = (fn, phases(fn, header, lines, inner), facts.get(short, {}))
    return out


# ---- The budget at a shape ------------------------------------------------------------------------
H200 = {"sms": 132, "schedulers": 4, "ghz": 1.98}
CUB = {"B": 80, "D": 128, "HW": 49, "M": 2000}
PRECISIONS = {"highest": "FfmaSearch", "high": "MmaSearch<true>", "medium": "MmaSearch<false>"}
# forward.cuh constants the model needs (checked against the source by the test)
kBM, kBK, kDC, kWarps, kRescoreBatch = 128, 64, 32, 8, 8


def candidate_stats(precision: str, B: int = 4, M: int = 256, seed: int = 0, HW: int = 49, D: int = 128) -> dict:
    """Candidates of the certified search on random CUB-like data (z and p uniform in [0, 1): ProtoPNet's
    sigmoid add-on and its prototype initialisation), from the CPU emulator's recorded (v~, delta)
    (csrc/emu/check.py: emu_search_values; one patch tile, so T_m is the tile's minimum of v~ + delta). Per
    (b, m): mean candidates; per warp and tile (warp w rescores prototypes w, w + 8, ... of its block's 128):
    mean rescoring rounds ("batches") ceil(C_w / kRescoreBatch), and the compaction's write-loop trips (the
    warp's busiest lane: a lane holds one prototype's flags of half the tile)."""
    import torch

    check = _check()
    if HW > kBK:
        raise ValueError("candidate_stats models one patch tile per image (HW <= 64)")
    lib = _emulator(check)
    gen = torch.Generator().manual_seed(seed)
    z3, p = torch.rand(B, D, HW, generator=gen), torch.rand(M, D, generator=gen)
    v, delta = check.emu_search_values(lib, z3, p, precision)
    thr = torch.where(torch.isfinite(v), v + delta, torch.inf).amin(2, keepdim=True)
    cand = (v - delta) <= thr  # (B, M, HW)
    per_bm = cand.sum(2)  # (B, M)
    per_warp = per_bm.reshape(B, M // kBM, kBM // kWarps, kWarps).sum(2).flatten().double()  # ml % 8 = warp
    halves = torch.nn.functional.pad(cand, (0, kBK - HW)).reshape(B, M // kBM, kBM // kWarps, kWarps, 2, kBK // 2)
    write_iters = halves.sum(5).amax((2, 4)).double().mean().item()
    return {"per_bm": per_bm.double().mean().item(), "per_warp_tile": per_warp.mean().item(),
            "batches": torch.ceil(per_warp / kRescoreBatch).mean().item(), "write_iters": write_iters}


_EMU = {}


def _check():
    """csrc/emu/check.py, the emulator's Python side."""
    sys.path.insert(0, str(CSRC / "emu"))
    try:
        import check
    finally:
        sys.path.remove(str(CSRC / "emu"))
    return check


def _emulator(check):
    if "lib" not in _EMU:
        build_dir = tempfile.mkdtemp(prefix="cuda_sass_emu")
        atexit.register(shutil.rmtree, build_dir, ignore_errors=True)
        _EMU["lib"] = check.build(Path(build_dir))
    return _EMU["lib"]


def forward_launch(shape: dict, sms: int) -> tuple[bool, int, int]:
    """(p-resident, images per block, blocks) that csrc/forward.cuh forward_launch picks at 2 x sms slots (the
    launcher itself, through the emulator build)."""
    check = _check()
    out = (ctypes.c_longlong * 4)()
    prm = check.ForwardParams(B=shape["B"], D=shape["D"], HW=shape["HW"], M=shape["M"])
    _emulator(check).emu_forward_launch(ctypes.byref(prm), 2 * sms, out)
    grid_x, grid_y, ipb, resident = out
    return bool(resident), ipb, grid_x * grid_y


def forward_z_copy(shape: dict, precision: str) -> int:
    """The z copy path (csrc/forward.cuh kZ*: the forward kernel's first template argument) that the launcher
    picks for contiguous NCHW z (16-byte aligned) at ``shape`` and ``precision`` (through the emulator build)."""
    check = _check()
    D, HW = shape["D"], shape["HW"]
    prm = check.ForwardParams(z=1 << 20, z_sb=D * HW, z_sd=HW, z_sk=1, B=shape["B"], D=D, HW=HW, M=shape["M"],
                              precision=check.PRECISIONS[precision])
    return _emulator(check).emu_forward_z_copy(ctypes.byref(prm))


def backward_launch(shape: dict) -> dict[str, int]:
    """csrc/backward.cuh backward_launch at ``shape`` (the launcher itself, through the emulator build)."""
    check = _check()
    return check.backward_launch(_emulator(check), shape["B"], shape["D"], shape["HW"], shape["M"])


def forward_per_tile(ph: dict[str, PhaseCount], shape: dict, cand: dict) -> dict[str, float]:
    """Warp-instructions one warp issues per (image, 64-patch tile) of its block, by phase (the model: see
    the module docstring). Stages per tile n_d = D / 32; the norms' z loop runs on 2 of the 8 warps (threads
    < 64, one FFMA per channel), the p norms once per block (left out); outputs once per image on 4 warps."""
    n_d = -(-shape["D"] // kDC)
    tiles = -(-shape["HW"] // kBK)
    out = {
        "pipeline": ph["pipeline"].executed(n_d),
        "clear": ph["clear"].executed(),  # the accumulators' zeros, once per tile (its test: in the pipeline)
        "search": ph["search"].executed(n_d),
        "norms": n_d * (2 / kWarps) * ph["norms"].executed(1, "FFMA", 1, kDC),
        "(1) threshold": ph["(1) threshold"].executed(),
        "(2) flags": ph["(2) flags"].executed(),
        # (3): the compaction once (its write loop as often as the warp's busiest lane has candidates), then
        # ceil(C_w / 8) rounds of 8 candidates: entry, set-up and butterfly, the channel loop (lane s: whole chunks
        # of 8 channels 8 s + 32 t.., 8 FFMA each, D / 32 of them at D % 32 == 0), the last partial chunk
        # (D % 8 != 0 only; else its test, 2 instructions), the fold
        "(3) compact": ph["(3) compact"].executed(1, "STS", 1, cand["write_iters"]),
        "(3) round": ph["(3) round"].executed(cand["batches"]),
        "(3) exact_distance": ph["(3) exact_distance"].executed(cand["batches"]),
        "(3) channel loop": ph["(3) channel loop"].executed(cand["batches"], "FFMA", 8, -(-shape["D"] // 32)),
        "(3) tail": ph["(3) tail"].executed(cand["batches"]) if shape["D"] % 8 else 2.0 * cand["batches"],
        "(3) fold": ph["(3) fold"].executed(cand["batches"]),
        "outputs": ph["outputs"].executed(0.5 / tiles),
    }
    return out


def rescoring_per_candidate(per_tile: dict[str, float], cand: dict) -> float:
    """Warp-instructions of the forward's phase (3), the certified rescoring, per candidate (issue 9: < 50)."""
    return sum(v for k, v in per_tile.items() if k.startswith("(3)")) / max(cand["per_warp_tile"], 1e-9)


def scanning_per_warp(ph: dict[str, PhaseCount], shape: dict, KT: int, seg: int) -> dict[str, float]:
    """grad_z_block<1> (the scanning plan), per warp: passes of KT patches, chunks of 32 prototypes, one pair
    update per (image, prototype) (its winner lies in one pass; the per-pair tests of losers, about 2
    instructions each, are left out)."""
    G, HW = 1, shape["HW"]
    passes = -(-HW // KT)
    rows = G * KT
    chunks = seg // 32
    pair = ph["grad_z pair"]
    gz = {
        "grad_z pass": ph["grad_z pass"].executed(passes),
        "grad_z clear": ph["grad_z clear"].executed(passes, "STS", 1, rows * 33 / 32),
        "grad_z stage z": ph["grad_z stage z"].executed(passes, "STS", 1, rows * 32 / (kWarps * 32)),
        "grad_z chunk": ph["grad_z chunk"].executed(passes * chunks),
        "grad_z pair": pair.executed(1, "FFMA", 1, G * seg),  # one FFMA per pair update
        "grad_z sum + write": ph["grad_z sum + write"].executed(passes, "STG", 1, rows * 32 / (kWarps * 32)),
    }
    if passes > 1:  # halves of a chunk holding prototypes that win in another pass: the tested row loads and pair
        # updates (an upper bound: every half charged both ways); at one pass every prototype wins in it
        gz["grad_z rows, partial"] = ph["grad_z rows, partial"].executed(passes * chunks)
        gz["grad_z pair, partial"] = ph["grad_z pair, partial"].executed(1, "FFMA", 1, G * seg)
    return gz


def sorted_per_warp(ph: dict[str, PhaseCount], shape: dict, KT: int, seg: int) -> dict[str, float]:
    """grad_z_sorted_block, per warp: (1) ceil(M / 1024) rounds of 4 prototypes per thread; (2) and (4) seg /
    32 chunks of the warp's prototypes (one MATCH each); (3) the scan, ceil(HW / 256) steps of 32 patches per
    warp (an upper bound: every instruction of its three loops charged per step); passes of KT patches: KT /
    8 copies per thread, the walk over M / 8 winners per warp in batches of 8 (the tail of fewer left out),
    a flush per patch (one of its 9 copies), 4 rows of ceil(KT / 32) stores."""
    M, HW = shape["M"], shape["HW"]
    passes = -(-HW // KT)

    def loop(name, marker, iters):  # the phase's loops `iters` times, the rest once
        pc = ph[name]
        return pc.executed(1.0, marker, pc.count(marker, pc.loop or pc.opcodes), iters)

    return {
        "grad_zs load": loop("grad_zs load", "LDG", -(-M // (4 * kWarps * 32))),
        "grad_zs count": loop("grad_zs count", "MATCH", seg / 32),
        "grad_zs scan": loop("grad_zs scan", "SHFL", -(-HW // (32 * kWarps))),
        "grad_zs scatter": loop("grad_zs scatter", "MATCH", seg / 32),
        "grad_zs stage": ph["grad_zs stage"].executed(passes, "LDGSTS", 1, -(-KT // kWarps)),
        "grad_zs walk": loop("grad_zs walk", "FFMA", M / kWarps / 8),
        "grad_zs flush": ph["grad_zs flush"].hot / 9 * HW / kWarps,  # once per patch (9 copies: batch and tail)
        "grad_zs write": ph["grad_zs write"].executed(passes, "STG", 1, 4 * -(-KT // 32)),
    }


def backward_per_warp(ph: dict[str, PhaseCount], shape: dict) -> dict[str, dict[str, float]]:
    """Warp-instructions one warp issues in a grad_z block and in a grad_p block, by phase (backward.cuh's
    launch at ``shape``, from backward_launch): grad_z by the launch's plan (scanning_per_warp or
    sorted_per_warp); grad_p: stages of NB images (per image, the 16-byte copies of its z slice)."""
    B, HW = shape["B"], shape["HW"]
    launch = backward_launch(shape)
    G, KT, seg = launch["G"], launch["KT"], launch["seg"]
    if launch["gz_sorted"]:
        gz = sorted_per_warp(ph, shape, KT, seg)
    elif G != 1:
        raise ValueError("the model counts grad_z_block<1>; the two-image instance is not modelled")
    else:
        gz = scanning_per_warp(ph, shape, KT, seg)
    passes, chunks = -(-HW // KT), seg // 32
    NB = launch["gp_images"]
    stages = -(-B // NB)
    per_block = stages / launch["gp_parts"]  # a grad_p block's stages, on average over its tile's parts
    gp = {
        "grad_p setup": ph["grad_p setup"].executed(),
        "grad_p stage": ph["grad_p stage"].executed(per_block),
        # NCHW z (16-byte aligned at the CUB shape): per image, 16-byte copies of its 32-channel run of 32 HW floats
        "grad_p issue z": ph["grad_p issue z"].nested(per_block, "LDGSTS", NB, 8 * HW / (kWarps * 32)),
        "grad_p issue g, k": ph["grad_p issue g, k"].executed(per_block, "STS", 2, NB * 64 / (kWarps * 32)),
        "grad_p image": ph["grad_p image"].executed(per_block, "FFMA", 8, NB),
        "grad_p store": ph["grad_p store"].executed(),
        "grad_p parts": ph["grad_p parts"].executed() if launch["gp_parts"] > 1 else 0.0,
        # one block of a tile's gp_parts sums them: charged to each as 1 / gp_parts of a run
        "grad_p parts sum": ph["grad_p parts sum"].executed(1 / launch["gp_parts"]) if launch["gp_parts"] > 1
        else 0.0,
    }
    return {"grad_z": gz, "grad_p": gp, "launch": {"G": G, "KT": KT, "passes": passes, "chunks": chunks,
                                                    "NB": NB, "stages": stages, "parts": launch["gp_parts"],
                                                    "gz_blocks": launch["gz_blocks"], "gp_first": launch["gp_first"],
                                                    "gp_blocks": launch["blocks"] - launch["gz_blocks"]}}


def floor_us(warp_instructions_per_sm: float, gpu: dict = H200) -> float:
    """Issue floor: warp-instructions of the busiest SM at one per scheduler and cycle."""
    return warp_instructions_per_sm / gpu["schedulers"] / (gpu["ghz"] * 1e3)


def budget(kernels: dict, shape: dict = CUB, gpu: dict = H200, cand_B: int = 4, cand_M: int = 256) -> dict:
    """The static issue budget at ``shape``: per precision and forward plan, and for the backward. Maps of
    several patch tiles (HW > 64) charge every tile a first tile's candidates (statistics of one 64-patch
    tile): an upper bound for the rescoring, whose running threshold leaves later tiles fewer."""
    resident, ipb, blocks = forward_launch(shape, gpu["sms"])
    plans = {"p-resident" if resident else "streaming": (resident, ipb, blocks)}
    grid_x = -(-shape["M"] // kBM)
    plans.setdefault("streaming", (False, 1, grid_x * shape["B"]))
    tiles = -(-shape["HW"] // kBK)
    out = {"shape": shape, "gpu": gpu, "forward": {}, "backward": {}}
    for precision, search in PRECISIONS.items():
        cand = candidate_stats(precision, B=cand_B, M=cand_M, HW=min(shape["HW"], kBK), D=shape["D"])
        for plan, (res, ipb_, blocks_) in plans.items():
            name = f"forward_kernel<{forward_z_copy(shape, precision)}, {search}, {str(res).lower()}>"
            _, ph, facts = kernels[name]
            per_tile = forward_per_tile(ph, shape, cand)
            once = ph["prologue"].hot + (ph["pipeline setup"].hot if "pipeline setup" in ph else 0)
            per_block = kWarps * ipb_ * tiles * sum(per_tile.values()) + kWarps * once
            busiest = -(-blocks_ // gpu["sms"])  # blocks the busiest SM runs (equal blocks, 2 resident at a time)
            out["forward"][f"{precision} {plan}"] = {
                "kernel": name, "registers": facts.get("registers"), "images_per_block": ipb_, "blocks": blocks_,
                "candidates": cand,
                "static": {k: v.static for k, v in ph.items()}, "hot": {k: v.hot for k, v in ph.items()},
                "mma": {k: v.count("HMMA") for k, v in ph.items()},
                "per_warp_tile": per_tile, "per_block": per_block,
                "rescoring_per_candidate": rescoring_per_candidate(per_tile, cand),
                "per_sm_mean": per_block * blocks_ / gpu["sms"], "per_sm_busiest": per_block * busiest,
                "floor_us_mean": floor_us(per_block * blocks_ / gpu["sms"], gpu),
                "floor_us": floor_us(per_block * busiest, gpu)}
    _, ph, facts = kernels["backward_kernel"]
    bw = backward_per_warp(ph, shape)
    gz, gp = kWarps * sum(bw["grad_z"].values()), kWarps * sum(bw["grad_p"].values())
    n_gz, n_gp = bw["launch"]["gz_blocks"], bw["launch"]["gp_blocks"]
    # round-robin dispatch of the 1-D grid (the launch's role order: gp_first), up to 3 blocks per SM in one wave
    load = [0.0] * gpu["sms"]
    first, second = ((n_gp, gp), (n_gz, gz)) if bw["launch"]["gp_first"] else ((n_gz, gz), (n_gp, gp))
    for i in range(n_gz + n_gp):
        load[i % gpu["sms"]] += first[1] if i < first[0] else second[1]
    out["backward"] = {"registers": facts.get("registers"), **bw,
                       "static": {k: v.static for k, v in ph.items()}, "hot": {k: v.hot for k, v in ph.items()},
                       "per_block": {"grad_z": gz, "grad_p": gp},
                       "per_sm_mean": sum(load) / gpu["sms"], "per_sm_busiest": max(load),
                       "floor_us_mean": floor_us(sum(load) / gpu["sms"], gpu), "floor_us": floor_us(max(load), gpu)}
    return out


# ---- Measured stalls by phase -----------------------------------------------------------------------
STALL_REASONS = ("barrier", "branch_resolving", "dispatch", "drain", "imc", "lg", "long_sb", "math", "membar", "mio",
                 "misc", "no_inst", "not_selected", "selected", "short_sb", "sleep", "tex", "wait")


def ncu_source_pages(text: str) -> dict[str, list[dict[str, str]]]:
    """Kernel name -> rows (column -> value) of ``ncu --page source --csv --print-source sass`` output: one
    row per SASS instruction in address order, with its warp-stall samples (benchmarks/gpu_check.sh, step
    stalls, writes it as stalls-sass.csv.gz)."""
    import csv
    import io

    pages: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            name = next(csv.reader([line]))[1]
            pages[name] = []
        elif name is not None:
            pages[name].append(line)
    return {k: list(csv.DictReader(io.StringIO("\n".join(v)))) for k, v in pages.items()}


def stall_phases(fn: Function, file: str, lines: dict[int, str | None], rows: list[dict[str, str]],
                 inner: dict[int, tuple[str, str]] | None = None) -> dict[str, dict[str, float]]:
    """Per phase of a kernel: its share of the measured warp-stall samples, executed warp-instructions, excess
    shared wavefronts (bank conflicts) and the share of each stall reason in its samples, from a device's ncu
    source page (``rows``, ncu_source_pages) of the same SASS as ``fn`` (same compiler and flags: checked
    opcode by opcode)."""
    def num(row, key):
        try:
            return float(row.get(key, "0").replace(",", "") or 0)
        except ValueError:
            return 0.0

    ops = [row["Source"].split(";")[0].strip() for row in rows]
    ops = [op.split(None, 1)[1] if op.startswith("@") else op for op in ops]
    if [op.split()[0] if op else "" for op in ops] != fn.opcodes:
        raise ValueError(f"{fn.name}: the measured SASS is not this build's ({len(ops)} against {len(fn.opcodes)} "
                         "instructions, or other opcodes)")
    total = sum(num(r, "Warp Stall Sampling (All Samples)") for r in rows) or 1.0
    out: dict[str, dict[str, float]] = {}
    for tag, row in zip(phase_tags(fn, file, lines, inner), rows):
        p = out.setdefault(tag, {"samples": 0.0, "executed": 0.0, "shared_excess": 0.0, **{r: 0.0 for r in STALL_REASONS}})
        p["samples"] += num(row, "Warp Stall Sampling (All Samples)")
        p["executed"] += num(row, "Instructions Executed")
        p["shared_excess"] += num(row, "L1 Wavefronts Shared Excessive")
        for r in STALL_REASONS:
            p[r] += num(row, "stall_" + r)
    for p in out.values():
        samples = p["samples"] or 1.0
        for r in STALL_REASONS:
            p[r] /= samples
        p["share"] = p["samples"] / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["samples"]))


def print_stalls(kernels: dict, csv_path: Path) -> None:
    """``--stalls FILE``: the measured samples of every kernel of FILE that this build compiles, by phase."""
    import gzip

    raw = gzip.open(csv_path, "rt").read() if csv_path.suffix == ".gz" else csv_path.read_text()
    from tests.test_cuda_gates import _short

    for name, rows in ncu_source_pages(raw).items():
        short = _short(name.replace("<unnamed>::", "").replace("(int)", "").replace("(bool)1", "true")
                       .replace("(bool)0", "false"))
        if short not in kernels:
            continue
        fn, _, _ = kernels[short]
        header, table, inner_table = SOURCES["forward.cu" if short.startswith("forward") else "backward.cu"]
        try:
            ph = stall_phases(fn, header, phase_lines(CSRC / header, table), rows,
                              inner_lines(CSRC / header, inner_table))
        except ValueError as err:  # measured on other sources (an older commit)
            print(f"{short}: {err}")
            continue
        print(f"{short}: share of warp-stall samples, executed warp-instructions, excess shared wavefronts, top stalls")
        for phase, p in ph.items():
            top = sorted(STALL_REASONS, key=lambda r: -p[r])[:3]
            print(f"  {phase:24} {100 * p['share']:5.1f}%  {p['executed'] / 1e6:6.2f}M  "
                  f"{p['shared_excess'] / 1e3:6.0f}k  "
                  + ", ".join(f"{r} {100 * p[r]:.0f}%" for r in top))


def main(argv: list[str]) -> int:
    if "--stalls" in argv:  # --stalls stalls-sass.csv[.gz]: a device's measured stalls by phase
        with tempfile.TemporaryDirectory() as tmp:
            print_stalls(compile_kernels(Path(tmp)), Path(argv[argv.index("--stalls") + 1]))
        return 0
    shape = CUB
    if "--shape" in argv:  # --shape B,D,HW,M
        shape = dict(zip(("B", "D", "HW", "M"), map(int, argv[argv.index("--shape") + 1].split(","))))
    with tempfile.TemporaryDirectory() as tmp:
        kernels = compile_kernels(Path(tmp))
    result = budget(kernels, shape)
    if "--json" in argv:
        print(json.dumps(result, indent=1, default=str))
        return 0
    for key, f in result["forward"].items():
        c = f["candidates"]
        print(f"forward {key}: {f['kernel']}, {f['registers']} registers, {f['blocks']} blocks of "
              f"{f['images_per_block']} images; candidates per (b, m) {c['per_bm']:.2f}, per warp-tile "
              f"{c['per_warp_tile']:.1f} ({c['batches']:.2f} batches)")
        print(f"  {'phase':22} {'static':>6} {'hot':>6} {'per warp-tile':>13}")
        for phase, n in f["per_warp_tile"].items():
            print(f"  {phase:22} {f['static'][phase]:6} {f['hot'][phase]:6} {n:13.0f}")
        print(f"  rescoring (3) per candidate {f['rescoring_per_candidate']:.1f} warp-instructions")
        print(f"  per block {f['per_block']:.3g}, per SM mean {f['per_sm_mean']:.3g} busiest "
              f"{f['per_sm_busiest']:.3g} warp-instructions: issue floor {f['floor_us']:.1f} us "
              f"(mean {f['floor_us_mean']:.1f} us)")
    b = result["backward"]
    print(f"backward: {b['registers']} registers, {b['launch']}")
    for role in ("grad_z", "grad_p"):
        for phase, n in b[role].items():
            print(f"  {phase:22} {b['static'][phase]:6} {b['hot'][phase]:6} {n:13.0f} per warp")
    print(f"  per block grad_z {b['per_block']['grad_z']:.3g}, grad_p {b['per_block']['grad_p']:.3g}; per SM "
          f"mean {b['per_sm_mean']:.3g}, busiest {b['per_sm_busiest']:.3g}: issue floor {b['floor_us']:.1f} us "
          f"(mean {b['floor_us_mean']:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
