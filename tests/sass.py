"""SASS reading shared by the offline sm_90 tools (tests/kernels/sm90_gate.py for the Triton kernels,
tests/cuda_sass.py for csrc/): nvdisasm's text -> per-function instruction lists (opcode, and with
``-gi`` line info the source location stack of each instruction), loops (back-edge branches) and the
instruction mix by opcode class. No GPU: cubins are disassembled offline with the nvdisasm that ships
with Triton."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# SASS opcode classes of ``sass_count`` (base opcode, before the first '.'); the rest count as "other".
SASS_CLASSES = {
    "mma": ("HGMMA", "HMMA", "WARPGROUP"),
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "MUFU", "FCHK"),
    "ldg_stg": ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "RED", "ATOM"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "bar": ("BAR", "DEPBAR", "SYNCS", "MEMBAR"),
    "int_alu": ("IMAD", "IADD3", "LOP3", "ISETP", "LEA", "SHF", "SEL", "IMNMX", "IABS", "I2F", "F2I", "PRMT",
                "IADD", "VIADD", "VIMNMX", "SGXT", "I2FP", "UIADD3", "UIMAD", "ULOP3", "USHF", "ULEA", "UISETP",
                "USEL", "UMOV", "MOV", "S2R", "S2UR", "CS2R", "R2UR", "POPC", "FLO", "PLOP3", "P2R", "R2P", "VOTE",
                "VOTEU", "UPLOP3"),
    "shfl": ("SHFL",),
    "branch": ("BRA", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "WARPSYNC", "NOP", "YIELD"),
}
_OPCLASS = {op: cls for cls, ops in SASS_CLASSES.items() for op in ops}

_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_FUNC = re.compile(r"^\.text\.(\S+):")


def sass_count(opcodes: list[str]) -> dict:
    """Instruction mix of a list of opcodes: total, count per SASS_CLASSES class (+ "other"), top 12 opcodes."""
    mix = {"total": len(opcodes)}
    for cls in list(SASS_CLASSES) + ["other"]:
        mix[cls] = 0
    top: dict[str, int] = {}
    for op in opcodes:
        base = op.split(".")[0]
        mix[_OPCLASS.get(base, "other")] += 1
        top[base] = top.get(base, 0) + 1
    mix["top"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    return mix


@dataclass
class Function:
    """One function's SASS: opcodes in address order, each instruction's source stack (outermost frame
    first, (file basename, line); empty without line info), whether it is predicated, label -> instruction
    index, and branches (index, target label)."""
    name: str
    opcodes: list[str] = field(default_factory=list)
    stacks: list[tuple[tuple[str, int], ...]] = field(default_factory=list)
    predicated: list[bool] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    branches: list[tuple[int, str]] = field(default_factory=list)

    @property
    def loops(self) -> list[tuple[str, int, int]]:
        """Back-edge loops in branch order; an inner loop's instructions lie in its outer loop's range too.
        Not the closing ``BRA`` to itself of a function's end."""
        return [(t, self.labels[t], at) for at, t in self.branches if t in self.labels and self.labels[t] < at]

    def hot(self) -> list[bool]:
        """Per instruction: reachable from the entry by fall-through and branches, not taking ``BRA.DIV``
        (the fallbacks of warp-collective operations for divergent warps) nor ``CALL`` (slow-path
        subroutines, e.g. of sqrtf or division): the code a converged warp runs on ordinary values."""
        targets = dict(self.branches)
        seen = [False] * len(self.opcodes)
        todo = [0]
        while todo:
            i = todo.pop()
            if i >= len(self.opcodes) or seen[i]:
                continue
            seen[i] = True
            op = self.opcodes[i]
            base = op.split(".")[0]
            if base == "BRA" and ".DIV" not in op and i in targets:
                if targets[i] in self.labels:
                    todo.append(self.labels[targets[i]])
                if self.predicated[i]:
                    todo.append(i + 1)
            elif base not in ("EXIT", "RET", "BRA") or self.predicated[i] or ".DIV" in op:
                todo.append(i + 1)
        return seen


def parse_sass(text: str) -> list[Function]:
    """Functions of nvdisasm ``-c`` text (with ``-gi``: the inline stack of every instruction). An
    instruction without location lines of its own keeps the previous instruction's stack."""
    funcs: list[Function] = []
    fn: Function | None = None
    pending: list[tuple[str, int]] = []  # innermost first, as nvdisasm prints them
    stack: tuple[tuple[str, int], ...] = ()
    for line in text.splitlines():
        head = _FUNC.match(line)
        if head:
            fn = Function(head.group(1))
            funcs.append(fn)
            pending, stack = [], ()
            continue
        if fn is None:
            continue
        loc = _LINE.match(line)
        if loc:
            pending.append((os.path.basename(loc.group(1)), int(loc.group(2))))
            continue
        label = _LABEL.match(line)
        if label:
            fn.labels[label.group(1)] = len(fn.opcodes)
            continue
        ins = _INSTR.match(line)
        if ins is None:
            continue
        if pending:
            stack, pending = tuple(reversed(pending)), []
        pred, op, args = ins.groups()
        target = _TARGET.search(args)
        if op.split(".")[0] == "BRA" and target:
            fn.branches.append((len(fn.opcodes), target.group(1)))
        fn.opcodes.append(op)
        fn.stacks.append(stack)
        fn.predicated.append(pred is not None and not pred.startswith(("@PT", "@UPT")))
    return funcs


def nvdisasm() -> str:
    """Path of the nvdisasm that ships with Triton."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin: bytes, line_info: bool = False) -> str:
    """nvdisasm -c text of a cubin (with -gi: source lines and inline stacks, if compiled with -lineinfo)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        flags = ["-c", "-gi"] if line_info else ["-c"]
        return subprocess.run([nvdisasm(), *flags, f.name], check=True, capture_output=True, text=True).stdout
