"""Run the CUDA kernels of csrc/kernels.cu on the CPU emulator (emulator.h) against a float64 reference.

No GPU needed: checks the kernels' indexing, tiling edges, strides, tie-break, NaN propagation and
gradients on small shapes. It cannot see GPU-only problems (races, timing, cp.async, launch limits).

    python csrc/emu/check.py            # build with g++ and run every case; exit status 1 on failure

Every case runs at the three search precisions: "highest" (FFMA), "high" (3xTF32 MMA) and "medium" (TF32
MMA), the tensor-core ones through an emulated mma.sync that follows the PTX fragment layout.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
REPO = CSRC.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.reference import original_layer, rel_err  # noqa: E402


class ForwardParams(ctypes.Structure):
    _fields_ = [("z", ctypes.c_void_p), ("z_sb", ctypes.c_int64), ("z_sd", ctypes.c_int64),
                ("z_sk", ctypes.c_int64), ("p", ctypes.c_void_p), ("similarity", ctypes.c_void_p),
                ("min_distances", ctypes.c_void_p), ("patch_index", ctypes.c_void_p),
                ("B", ctypes.c_int), ("D", ctypes.c_int), ("HW", ctypes.c_int), ("M", ctypes.c_int),
                ("eps", ctypes.c_float), ("precision", ctypes.c_int)]


# precision -> (ForwardParams.precision, tolerance of the picked patch's distance over the minimum, relative,
# norm-wise relative error of min_distances, absolute error of similarity). TF32 may pick a near-tie, whose
# distance is still computed exactly; a near-tie at a tiny distance moves the log-similarity most.
PRECISIONS = {"highest": (0, 1e-6, 1e-5, 1e-4), "high": (1, 1e-5, 1e-5, 1e-4), "medium": (2, 2e-3, 1e-3, 1e-2)}


class BackwardParams(ctypes.Structure):
    _fields_ = [("grad_similarity", ctypes.c_void_p), ("grad_min_distances", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("z_sb", ctypes.c_int64), ("z_sk", ctypes.c_int64),
                ("p", ctypes.c_void_p), ("patch_index", ctypes.c_void_p), ("min_distances", ctypes.c_void_p),
                ("grad_z", ctypes.c_void_p), ("grad_p", ctypes.c_void_p),
                ("B", ctypes.c_int), ("D", ctypes.c_int), ("HW", ctypes.c_int), ("M", ctypes.c_int),
                ("eps", ctypes.c_float)]


def build(out_dir: Path) -> ctypes.CDLL:
    """Compile kernels.cu (up to its host launchers) with the emulator into a shared library."""
    src = (CSRC / "kernels.cu").read_text()
    src = src[: src.index("// ==== Host launchers")]
    src, n = re.subn(r"extern __shared__ (?:__align__\(\d+\) )?float (\w+)\[\];",
                     r"float* const \1 = EMU_DYNAMIC_SMEM;", src)
    assert n == 2, "expected two dynamic shared-memory declarations"
    (out_dir / "kernels_emu.inc").write_text(src)
    lib = out_dir / "libprotokern_emu.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE / 'fake'}", f"-I{HERE}",
           f"-I{CSRC}", f"-I{out_dir}", str(HERE / "harness.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def emu_forward(lib, z3: torch.Tensor, p: torch.Tensor, eps: float = 1e-4, precision: str = "highest"):
    """The forward kernel on z3 (B, D, HW) float32 (any strides) and p (M, D)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    p = p.contiguous()
    sim = torch.full((B, M), -7.0)  # poisoned: every element must be written
    dist = torch.full((B, M), -7.0)
    idx = torch.full((B, M), -7, dtype=torch.int64)
    prm = ForwardParams(_ptr(z3), *z3.stride(), _ptr(p), _ptr(sim), _ptr(dist), _ptr(idx), B, D, HW, M, eps,
                        PRECISIONS[precision][0])
    lib.emu_forward(ctypes.byref(prm))
    return sim, dist, idx


def emu_backward(lib, grad_sim, grad_dist, z3, p, idx, dist, eps: float = 1e-4):
    """The backward kernels (z3 is made channel-contiguous first, as the op does)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    zc = z3 if z3.stride(1) == 1 else z3.transpose(1, 2).contiguous().transpose(1, 2)
    grad_z = torch.full((B, D, HW), -7.0)
    grad_p = torch.full((M, D), -7.0)
    gs, gd, idx, dist, p = (t.contiguous() for t in (grad_sim, grad_dist, idx, dist, p))
    prm = BackwardParams(_ptr(gs), _ptr(gd), _ptr(zc), zc.stride(0), zc.stride(2), _ptr(p), _ptr(idx),
                         _ptr(dist), _ptr(grad_z), _ptr(grad_p), B, D, HW, M, eps)
    lib.emu_backward(ctypes.byref(prm))
    return grad_z, grad_p


def make_z3(B, D, HW, layout):
    """z as the kernels see it, (B, D, HW), in several memory layouts."""
    if layout == "contiguous":
        return torch.rand(B, D, HW)
    if layout == "channels_last":  # stride_d = 1, stride_k = D
        return torch.rand(B, HW, D).transpose(1, 2)
    if layout == "strided_k":  # stride_k = 2, stride_d = 4 HW + 2
        return torch.rand(B, 2 * D, 2 * HW + 1)[:, ::2, 1::2]
    if layout == "strided_d":  # stride_d = 3, stride_k = 3 D
        return torch.rand(B, HW, 3 * D).transpose(1, 2)[:, ::3]
    raise ValueError(layout)


def check_case(lib, z3, p, *, grads=True, precision="highest") -> dict:
    """Forward (values, index) and backward of the emulated kernels against the float64 original."""
    B, D, HW = z3.shape
    _, idx_tol, dist_tol, sim_tol = PRECISIONS[precision]
    sim, dist, idx = emu_forward(lib, z3, p, precision=precision)
    zr, pr = z3.double()[..., None].requires_grad_(), p.double().requires_grad_()
    sim_ref, dist_ref = original_layer(zr, pr)
    full = ((z3.double()[:, None] - p.double()[None, :, :, None]) ** 2).sum(2)  # (B, M, HW)
    res = {
        "dist_rel": rel_err(dist, dist_ref),
        "sim_abs": (sim.double() - sim_ref).abs().max().item(),
        "idx_ok": bool((full.gather(2, idx[..., None])[..., 0] <= full.amin(2) * (1 + idx_tol) + 1e-9).all()),
    }
    if grads:
        w_sim, w_dist = torch.randn(B, p.shape[0]), torch.randn(B, p.shape[0])
        gz, gp = emu_backward(lib, w_sim, w_dist, z3, p, idx, dist)
        ((sim_ref * w_sim).sum() + (dist_ref * w_dist).sum()).backward()
        res["gz_rel"] = rel_err(gz, zr.grad[..., 0])
        res["gp_rel"] = rel_err(gp, pr.grad)
    res["ok"] = (res["dist_rel"] < dist_tol and res["sim_abs"] < sim_tol and res["idx_ok"]
                 and res.get("gz_rel", 0) < 1e-4 and res.get("gp_rel", 0) < 1e-4)
    return res


def special_cases(lib, precision: str = "highest") -> dict[str, bool]:
    """d = 0, ties, NaN."""
    out = {}
    z = torch.rand(2, 33, 4, 5)
    p = torch.rand(6, 33)
    p[3] = z[1, :, 2, 4]
    sim, dist, idx = emu_forward(lib, z.flatten(2), p, precision=precision)
    out["d=0"] = (dist[1, 3].item() == 0.0 and idx[1, 3].item() == 14
                  and abs(sim[1, 3].item() - 9.210340371976184) < 1e-4)

    z = torch.randint(0, 8, (2, 6, 3, 4)).float() / 8
    z[:, :, 2, 3] = z[:, :, 0, 1]
    p = z[:, :, 0, 1].clone()
    p[:, 0] += 0.125
    _, dist, idx = emu_forward(lib, z.flatten(2), p, precision=precision)
    gz, _ = emu_backward(lib, torch.zeros(2, 2), torch.eye(2), z.flatten(2), p, idx, dist)
    out["ties"] = (idx.diagonal().tolist() == [1, 1] and gz[:, :, 11].abs().sum().item() == 0
                   and gz[:, :, 1].abs().sum().item() > 0)

    z = torch.rand(2, 6, 70)  # duplicate patch in a later patch tile, and every patch equal
    z[1, :, 66] = z[1, :, 3]
    p = z[1, :, 3].clone()[None]
    _, _, idx = emu_forward(lib, z, p, precision=precision)
    _, _, idx_flat = emu_forward(lib, torch.ones(1, 5, 130), torch.rand(3, 5), precision=precision)
    out["ties across tiles"] = idx[1, 0].item() == 3 and bool((idx_flat == 0).all())

    z = torch.rand(3, 20, 4, 4)
    p = torch.rand(5, 20)
    z[0, 3, 1, 2] = float("nan")
    p[2, 7] = float("nan")
    sim, dist, idx = emu_forward(lib, z.flatten(2), p, precision=precision)
    nan = torch.zeros(3, 5, dtype=torch.bool)
    nan[0, :] = True
    nan[:, 2] = True
    out["nan"] = (torch.equal(dist.isnan(), nan) and torch.equal(sim.isnan(), nan)
                  and bool(((idx >= 0) & (idx < 16)).all()))
    return out


# (B, D, HW, M, layout): several patch tiles (HW=323), channel stages (D=67), prototype blocks (M=150).
CASES = [
    (2, 67, 17 * 19, 150, "contiguous"),
    (2, 40, 35, 130, "channels_last"),
    (2, 36, 81, 20, "strided_k"),
    (2, 33, 70, 9, "strided_d"),
    (1, 16, 1, 1, "contiguous"),
    (3, 8, 49, 5, "channels_last"),
    (1, 1, 9, 4, "contiguous"),
    (1, 5, 20, 300, "strided_k"),  # several prototype chunks per grad_z warp
    (33, 130, 4, 3, "strided_d"),  # grad_p: several batch chunks and channel passes
]


def run(verbose: bool = True, precisions=tuple(PRECISIONS)) -> bool:
    """Every case at every search precision (gradients once: the backward does not depend on it)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        ok = True
        for precision in precisions:
            for B, D, HW, M, layout in CASES:
                res = check_case(lib, make_z3(B, D, HW, layout), torch.rand(M, D), precision=precision,
                                 grads=precision == "highest")
                ok &= res["ok"]
                if verbose:
                    print(f"{precision:8} {(B, D, HW, M)!s:20} {layout:14}",
                          {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in res.items()})
            for name, good in special_cases(lib, precision).items():
                ok &= good
                if verbose:
                    print(f"{precision:8} {name:35} ok={good}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
