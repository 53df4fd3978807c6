// Standalone driver of the CPU emulator for sanitizer builds (ThreadSanitizer; AddressSanitizer +
// UndefinedBehaviorSanitizer), which cannot be loaded into Python: the CUB-shape tile configuration
// (D = 128, HW = 49, a full and a partial 128-prototype block) and the tail cases (one patch, one
// channel, a partial channel stage and patch tile), both z layouts, forward at every precision (the
// launcher's plan, and the streaming and p-resident plans explicitly) and backward (one launch, z with its
// own strides; gradients against a double reference). Exit status 0 only if every run meets the checks
// below; the sanitizers abort on their own.
// The emulator's fibers are TSan fibers ordered only by the barriers (emulator.h); -DPROTOKERN_EMU_THREADS
// runs real OS threads instead (slower, same checks):
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=thread -Icsrc/emu/fake -Icsrc/emu -Icsrc \
//       csrc/emu/harness.cpp csrc/emu/sanitize_main.cpp -o emu_tsan && ./emu_tsan
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "params.h"

extern "C" void emu_forward(const protokern::ForwardParams* prm);
extern "C" void emu_forward_plan(const protokern::ForwardParams* prm, int resident, int ipb);
extern "C" void emu_backward(const protokern::BackwardParams* prm, int reverse);
extern "C" int emu_errors();

namespace {

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
float uniform() {  // [0, 1) on a 2^-20 grid
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((rng_state >> 44) & 0xfffff) / (float)(1 << 20);
}

int failures = 0;
void expect(bool ok, const char* what, int B, int D, int HW, int M) {
  if (!ok) {
    std::printf("FAIL %s at (B, D, HW, M) = (%d, %d, %d, %d)\n", what, B, D, HW, M);
    ++failures;
  }
}

void run_case(int B, int D, int HW, int M, bool channels_last) {
  // z (B, D, HW): contiguous, or channels_last (stride_d = 1, stride_k = D)
  std::vector<float> z((size_t)B * D * HW), p((size_t)M * D);
  for (float& v : z) v = uniform();
  for (float& v : p) v = uniform();
  const int64_t sb = (int64_t)D * HW, sd = channels_last ? 1 : HW, sk = channels_last ? D : 1;
  if (M > 1) {  // a prototype equal to a patch: distance exactly 0
    for (int d = 0; d < D; ++d) p[(size_t)1 * D + d] = z[(size_t)(B - 1) * sb + d * sd + (HW - 1) * sk];
  }
  // The rescoring's rows (params.h ForwardParams::zr): (B, HW, D4), D4 = D rounded up to 4 (NaN padding, never
  // read), 16-byte aligned.
  const int64_t D4 = (D + 3) / 4 * 4;
  std::vector<float> rows_buf((size_t)B * HW * D4 + 4, NAN);
  float* const rows = rows_buf.data() + (4 - reinterpret_cast<uintptr_t>(rows_buf.data()) / 4 % 4) % 4;
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < HW; ++k)
      for (int d = 0; d < D; ++d) rows[((size_t)b * HW + k) * D4 + d] = z[(size_t)b * sb + d * sd + k * sk];
  const size_t BM = (size_t)B * M;
  std::vector<float> sim[3], dist[3];
  std::vector<int64_t> idx[3];
  for (int prec = 0; prec < 3; ++prec) {
    sim[prec].assign(BM, -7.f);
    dist[prec].assign(BM, -7.f);
    idx[prec].assign(BM, -7);
    protokern::ForwardParams prm{};
    prm.z = z.data();
    prm.z_sb = sb;
    prm.z_sd = sd;
    prm.z_sk = sk;
    prm.zr = rows;
    prm.zr_sb = HW * D4;
    prm.zr_sk = D4;
    prm.p = p.data();
    prm.similarity = sim[prec].data();
    prm.min_distances = dist[prec].data();
    prm.patch_index = idx[prec].data();
    prm.B = B;
    prm.D = D;
    prm.HW = HW;
    prm.M = M;
    prm.eps = 1e-4f;
    prm.precision = prec;
    emu_forward(&prm);
    for (int resident = 0; resident <= (D <= 128); ++resident) {  // streaming; p-resident, all images per block
      std::vector<float> sim2(BM, -7.f), dist2(BM, -7.f);
      std::vector<int64_t> idx2(BM, -7);
      prm.similarity = sim2.data();
      prm.min_distances = dist2.data();
      prm.patch_index = idx2.data();
      emu_forward_plan(&prm, resident, resident ? B : 1);
      expect(std::memcmp(dist2.data(), dist[prec].data(), BM * sizeof(float)) == 0 && idx2 == idx[prec] &&
                 std::memcmp(sim2.data(), sim[prec].data(), BM * sizeof(float)) == 0,
             "every plan gives the same bits", B, D, HW, M);
    }
  }
  for (int b = 0; b < B; ++b) {
    for (int m = 0; m < M; ++m) {  // the winner is an exact minimum (double) up to fp32 rounding
      double best = INFINITY;
      for (int k = 0; k < HW; ++k) {
        double s = 0;
        for (int d = 0; d < D; ++d) {
          const double diff = (double)z[b * sb + d * sd + k * sk] - p[(size_t)m * D + d];
          s += diff * diff;
        }
        best = std::fmin(best, s);
      }
      const size_t o = (size_t)b * M + m;
      const int64_t k = idx[0][o];
      expect(k >= 0 && k < HW, "patch_index in range", B, D, HW, M);
      if (k < 0 || k >= HW) continue;
      double s = 0;
      for (int d = 0; d < D; ++d) {
        const double diff = (double)z[b * sb + d * sd + k * sk] - p[(size_t)m * D + d];
        s += diff * diff;
      }
      expect(s <= best * (1 + 1e-5) + 1e-9, "winner is a minimum", B, D, HW, M);
      expect(std::fabs(dist[0][o] - s) <= 1e-5 * (1 + s), "exact distance of the winner", B, D, HW, M);
    }
  }
  for (int prec = 1; prec < 3; ++prec) {
    expect(std::memcmp(dist[prec].data(), dist[0].data(), BM * sizeof(float)) == 0 &&
               idx[prec] == idx[0] && std::memcmp(sim[prec].data(), sim[0].data(), BM * sizeof(float)) == 0,
           "bit-identical outputs at every precision", B, D, HW, M);
  }
  if (M > 1) expect(dist[0][(size_t)(B - 1) * M + 1] == 0.f && idx[0][(size_t)(B - 1) * M + 1] == HW - 1,
                    "prototype equal to a patch", B, D, HW, M);

  // Backward on z with its own strides (the kernel stages it as it is).
  std::vector<float> gs(BM), gm(BM), gz((size_t)B * D * HW, -7.f), gp((size_t)M * D, -7.f);
  for (size_t i = 0; i < BM; ++i) {
    gs[i] = uniform() - 0.5f;
    gm[i] = uniform() - 0.5f;
  }
  protokern::BackwardParams bp{};
  bp.grad_similarity = gs.data();
  bp.grad_min_distances = gm.data();
  bp.z = z.data();
  bp.z_sb = sb;
  bp.z_sd = sd;
  bp.z_sk = sk;
  bp.p = p.data();
  bp.patch_index = idx[0].data();
  bp.min_distances = dist[0].data();
  bp.grad_z = gz.data();
  bp.grad_p = gp.data();
  bp.B = B;
  bp.D = D;
  bp.HW = HW;
  bp.M = M;
  bp.eps = 1e-4f;
  emu_backward(&bp, 0);
  {  // the same bits with the blocks in the other order (another block adds grad_p's image parts)
    const std::vector<float> gz1 = gz, gp1 = gp;
    emu_backward(&bp, 1);
    expect(std::memcmp(gz.data(), gz1.data(), gz.size() * sizeof(float)) == 0 &&
               std::memcmp(gp.data(), gp1.data(), gp.size() * sizeof(float)) == 0,
           "gradients independent of the block order", B, D, HW, M);
  }
  bool finite = true;
  for (float v : gz) finite &= std::isfinite(v) && v != -7.f;
  for (float v : gp) finite &= std::isfinite(v) && v != -7.f;
  expect(finite, "every gradient element written and finite", B, D, HW, M);
  // Against a double reference at the forward's winners: 2 g (z - p), error relative to sum |terms|.
  std::vector<double> rz((size_t)B * D * HW, 0.0), az((size_t)B * D * HW, 0.0), rp((size_t)M * D, 0.0),
      ap((size_t)M * D, 0.0);
  for (int b = 0; b < B; ++b) {
    for (int m = 0; m < M; ++m) {
      const size_t o = (size_t)b * M + m;
      const double dd = dist[0][o], g = gm[o] + gs[o] * (1e-4 - 1.0) / ((dd + 1.0) * (dd + 1e-4));
      const int k = (int)idx[0][o];
      for (int d = 0; d < D; ++d) {
        const double t = 2 * g * ((double)z[b * sb + d * sd + k * sk] - p[(size_t)m * D + d]);
        rz[((size_t)b * D + d) * HW + k] += t;
        az[((size_t)b * D + d) * HW + k] += std::fabs(t);
        rp[(size_t)m * D + d] -= t;
        ap[(size_t)m * D + d] += std::fabs(t);
      }
    }
  }
  bool close = true;
  for (size_t i = 0; i < gz.size(); ++i) close &= std::fabs(gz[i] - rz[i]) <= 1e-5 * az[i] + 1e-30;
  for (size_t i = 0; i < gp.size(); ++i) close &= std::fabs(gp[i] - rp[i]) <= 1e-5 * ap[i] + 1e-30;
  expect(close, "gradients match the double reference", B, D, HW, M);
}

}  // namespace

int main() {
  run_case(1, 128, 49, 130, true);   // CUB tile configuration, channels_last z
  run_case(1, 128, 49, 130, false);  // same, contiguous z
  run_case(2, 33, 65, 3, false);     // partial channel stage and patch tile, tiny M
  run_case(1, 1, 1, 1, true);        // one channel, one patch, one prototype
  run_case(1, 40, 70, 9, true);
  run_case(5, 20, 49, 70, false);    // backward: image pairs and a single, grad_p stages of 5 images
  run_case(3, 128, 49, 130, true);   // CUB tile configuration, several images per block
  run_case(12, 20, 49, 70, true);    // grad_p: 3 image parts of a stage each (5, 5, 2 images)
  run_case(2, 24, 81, 300, false);   // grad_z sorted by patch (81 > one scanning pass), 5 warps' prototypes
  expect(emu_errors() == 0, "no cp.async group left in flight, no partial sum read unwritten, every part counted", 0,
         0, 0, 0);
  std::printf(failures == 0 ? "sanitized emulator: all checks passed\n" : "sanitized emulator: %d failures\n",
              failures);
  return failures == 0 ? 0 : 1;
}
