// C entry points of the CPU emulator (see emulator.h): the kernels of ../forward.cuh and
// ../backward.cuh, compiled by the host compiler with the same launch shapes as the launchers.
#include "emulator.h"

#include <cstdio>
#include <cstring>
#include <string>

#include "backward.cuh"
#include "forward.cuh"

using namespace protokern;

// The forward with an explicit plan: resident (p-resident) and ipb images per block.
extern "C" void emu_forward_plan(const ForwardParams* prm, int resident, int ipb) {
  if (prm->B == 0 || prm->M == 0) return;
  const ForwardParams p = *prm;
  const unsigned grid_x = (unsigned)((p.M + kBM - 1) / kBM), grid_y = (unsigned)((p.B + ipb - 1) / ipb);
  with_forward_kernel(p, p.precision, resident != 0, [&](auto kernel, size_t smem, int) {
    emu::launch({grid_x, grid_y}, kThreads, smem, [&] { kernel(p, ipb); });
  });
}

// The forward as the launcher runs it on a device with kEmuSlots resident blocks (one SM): blocks of
// small grids get several images, hence the p-resident plan where D allows it.
constexpr int kEmuSlots = 2;

extern "C" void emu_forward(const ForwardParams* prm) {
  if (prm->B == 0 || prm->M == 0) return;
  const ForwardLaunch l = forward_launch(*prm, kEmuSlots);
  emu_forward_plan(prm, l.resident, l.ipb);
}

// The launcher's forward launch shape for `slots` resident blocks: out = {grid_x, grid_y, ipb, resident}.
extern "C" void emu_forward_launch(const ForwardParams* prm, int slots, long long* out) {
  const ForwardLaunch l = forward_launch(*prm, slots);
  out[0] = l.grid_x;
  out[1] = l.grid_y;
  out[2] = l.ipb;
  out[3] = l.resident;
}

// The forward's z copy path (forward.cuh kZ*) for prm's z strides and alignment at its precision.
extern "C" int emu_forward_z_copy(const ForwardParams* prm) { return forward_z_copy(*prm, prm->precision); }

// The launcher's backward launch shape: out = {blocks, gz_blocks, d_slices, G, KT, seg, gp_images, gp_stage,
// gz_sorted, gp_first, gp_parts, gp_part_images, gp_part_stages}.
extern "C" void emu_backward_launch(const BackwardParams* prm, long long* out) {
  const BackwardLaunch l = backward_launch(*prm);
  const long long v[13] = {l.blocks, l.gz_blocks, l.d_slices, l.G, l.KT, l.seg, l.gp_images, l.gp_stage,
                           l.gz_sorted, l.gp_first, l.gp_parts, l.gp_part_images, l.gp_part_stages};
  for (int i = 0; i < 13; ++i) out[i] = v[i];
}

// The backward with its workspace (partial sums unwritten: emulator.h kUnwrittenBits; counters zero), its blocks run in
// decreasing index order where reverse != 0 (grad_p's parts are then added by another block).
extern "C" void emu_backward(const BackwardParams* prm, int reverse) {
  if (prm->B == 0 || prm->M == 0) return;
  BackwardParams p = *prm;
  const BackwardLaunch l = backward_launch(p);
  const BackwardWorkspace ws = backward_workspace(l, p);
  float unwritten;
  std::memcpy(&unwritten, &kUnwrittenBits, sizeof unwritten);
  std::vector<float> partial(ws.partial_floats, unwritten);
  std::vector<unsigned> count(ws.counters, 0u);
  p.gp_partial = partial.data();
  p.gp_count = count.data();
  emu::reverse_blocks = reverse != 0;
  emu::launch({l.blocks, 1}, kBwThreads, l.smem, [&] { backward_kernel(p, l); });
  emu::reverse_blocks = false;
  for (unsigned c : count) {
    if (c != (unsigned)l.gp_parts) emu::errors.fetch_add(1);  // every part counted once
  }
}

// The forward with its search values recorded (emulator.h: record_search, record_tile): out (B, M, HW, 4),
// tiles (B, M, ceil(HW / 64), 2).
extern "C" void emu_search_values(const ForwardParams* prm, float* out, float* tiles) {
  emu::search_log = out;
  emu::tile_log = tiles;
  emu::search_log_M = prm->M;
  emu::search_log_HW = prm->HW;
  emu::search_log_tiles = (prm->HW + 63) / 64;
  emu_forward(prm);
  emu::search_log = nullptr;
  emu::tile_log = nullptr;
}

// Protocol errors seen so far (cp.async groups left in flight at a thread's end, misaligned 16-byte copies).
extern "C" int emu_errors() { return emu::errors.load(); }

// 16-byte cp.async copies issued so far (which staging path the kernels took).
extern "C" long long emu_vector_copies() { return emu::vector_copies.load(); }
extern "C" long long emu_per_pair_tiles() { return emu::per_pair_tiles.load(); }

// One line per kernel variant, "name threads min_blocks_per_sm max_dynamic_smem_bytes", for the
// ptxas gate (tests/test_cuda_gates.py): the numbers the launchers use, from the same headers.
extern "C" int emu_kernel_table(char* out, int size) {
  std::string s;
  auto row = [&](const char* name, int threads, int min_blocks, size_t smem) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s %d %d %zu\n", name, threads, min_blocks, smem);
    s += buf;
  };
  auto forward_rows = [&](auto search, const char* name) {
    using S = decltype(search);
    char buf[96];
    for (int resident = 0; resident < 2; ++resident) {
      for (int zc = kZCols4; zc <= kZDense; ++zc) {  // forward.cuh ZCopy; no FFMA kZDense
        if (zc == kZDense && S::kSearch == kSearchFp32) continue;
        std::snprintf(buf, sizeof buf, "forward_kernel<%d, %s, %s>", zc, name, resident ? "true" : "false");
        const size_t smem = !resident        ? PlanOf<kZCols4, S, false>::kBytes
                            : zc == kZDense ? PlanOf<kZDense, S, true>::kBytes  // the z ring
                                            : PlanOf<kZCols4, S, true>::kBytes;
        row(buf, kThreads, S::kMinBlocks, smem);
      }
    }
  };
  forward_rows(FfmaSearch{}, "FfmaSearch");
  forward_rows(MmaSearch<true>{}, "MmaSearch<true>");
  forward_rows(MmaSearch<false>{}, "MmaSearch<false>");
  row("backward_kernel", kBwThreads, kBwMinBlocks, kBwMaxSmem);
  std::snprintf(out, size, "%s", s.c_str());
  return (int)s.size();
}
