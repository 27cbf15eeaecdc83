// y[M, N] = x[M, K] W^T for a float32 weight stored as panels of 16 outputs, P[N / 16][K][16] (the last panel
// zero-padded), on one core with AVX2 and FMA. Built and loaded by swarmllm/models/panels.py, which says why.
//
// A panel is read once per call, front to back, whatever M: rows go through it in blocks of at most 6 (12
// accumulators, 2 weight vectors and a broadcast fill AVX2's 16 registers), the first block streaming it from
// memory and the others finding it in L2. Each output is one float32 FMA chain over k in order, so a row's
// result does not depend on the rows that share its call.
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int kPanel = 16;
constexpr int kMaxRows = 6;

template <int R>
inline void block(const float* x, int64_t K, const float* panel, float* y, int64_t ldy, int64_t cols) {
    __m256 lo[R], hi[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 v = _mm256_broadcast_ss(x + r * K + k);
            lo[r] = _mm256_fmadd_ps(v, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(v, w1, hi[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        if (cols == kPanel) {
            _mm256_storeu_ps(y + r * ldy, lo[r]);
            _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
        } else {  // the last, padded panel
            alignas(32) float tmp[kPanel];
            _mm256_store_ps(tmp, lo[r]);
            _mm256_store_ps(tmp + 8, hi[r]);
            for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = tmp[j];
        }
    }
}

// one row through 4 panels at once: 8 independent FMA chains, enough to keep the FMA units fed while streaming
inline void one_row(const float* x, int64_t K, const float* panels, float* y) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    const int64_t stride = K * kPanel;
    for (int64_t k = 0; k < K; ++k) {
        const __m256 v = _mm256_broadcast_ss(x + k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            const float* w = panels + j * stride + k * kPanel;
            acc[2 * j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(w), acc[2 * j]);
            acc[2 * j + 1] = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + 8), acc[2 * j + 1]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(y + j * kPanel, acc[2 * j]);
        _mm256_storeu_ps(y + j * kPanel + 8, acc[2 * j + 1]);
    }
}

}  // namespace

// y has rows ldy apart (>= N): a caller may split one product's panels over threads
extern "C" void swarmllm_panel_gemm(const float* x, int64_t M, int64_t K, const float* P, int64_t N, float* y,
                                    int64_t ldy) {
    const int64_t panels = (N + kPanel - 1) / kPanel;
    int64_t p = 0;
    if (M == 1) {
        for (; (p + 4) * kPanel <= N; p += 4) one_row(x, K, P + p * K * kPanel, y + p * kPanel);
    }
    // rows split into ceil(M / 6) blocks of near-equal size (8 rows: 4 + 4, not 6 + 2, whose 2-row block would
    // leave the FMA units waiting on its 4 chains)
    const int64_t blocks = (M + kMaxRows - 1) / kMaxRows;
    for (; p < panels; ++p) {
        const float* panel = P + p * K * kPanel;
        const int64_t cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
        int64_t row = 0;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t rows = M / blocks + (b < M % blocks ? 1 : 0);
            const float* xb = x + row * K;
            float* yb = y + row * ldy + p * kPanel;
            switch (rows) {
                case 6: block<6>(xb, K, panel, yb, ldy, cols); break;
                case 5: block<5>(xb, K, panel, yb, ldy, cols); break;
                case 4: block<4>(xb, K, panel, yb, ldy, cols); break;
                case 3: block<3>(xb, K, panel, yb, ldy, cols); break;
                case 2: block<2>(xb, K, panel, yb, ldy, cols); break;
                default: block<1>(xb, K, panel, yb, ldy, cols); break;
            }
            row += rows;
        }
    }
}
