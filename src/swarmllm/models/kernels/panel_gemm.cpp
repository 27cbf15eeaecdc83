// y[M, N] = x[M, K] W^T for a weight stored as panels of 16 outputs, P[N / 16][K][16] (the last panel
// zero-padded), float32 inputs and sums, with AVX2, FMA and F16C. The weight is float32, bfloat16, float16, or
// int8 codes with one float32 scale per output (W = codes * scales, row-wise); each is widened to float32 in
// registers. Built and loaded by swarmllm/models/panels.py, which says why.
//
// The weight is read once per call, front to back, whatever M. Rows go through it in blocks of at most 6, and
// a block of few rows takes several panels at once: rows x 2 x panels accumulators stay within 12 of AVX2's 16
// registers, and enough independent FMA chains and weight streams are in flight to keep up with memory (one row
// alone through one panel would leave the FMA units waiting on its 2 chains); a block of 4-6 rows, one panel at
// a time, prefetches the next. The first block of rows streams the panels from memory, the others find them in
// L2. Each output is one float32 FMA chain over k in order (then scaled, for int8), so a row's result does not
// depend on the rows that share its call.
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int kPanel = 16;
constexpr int kMaxRows = 6;

struct bfloat16 { uint16_t bits; };
struct float16 { uint16_t bits; };

// 8 consecutive weights of a panel row as float32
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const int8_t* w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline __m256 load8(const bfloat16* w) {  // a bfloat16 is a float32's upper half
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const float16* w) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

// R rows through J consecutive panels; cols: the outputs left from the first of them (the last may be padded);
// scale: the first's output scales (int8), or null
template <int R, int J, typename T>
inline void block(const float* x, int64_t K, const T* panel, const float* scale, float* y, int64_t ldy,
                  int64_t cols) {
    const int64_t stride = K * kPanel;
    __m256 acc[R][2 * J];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < 2 * J; ++j) acc[r][j] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K; ++k) {
        __m256 w[2 * J];
        if (J == 1) {  // one panel is one memory stream: ask for the next panel's row too (a prefetch never faults)
            _mm_prefetch(reinterpret_cast<const char*>(panel + stride + k * kPanel), _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) {
            w[2 * j] = load8(panel + j * stride + k * kPanel);
            w[2 * j + 1] = load8(panel + j * stride + k * kPanel + 8);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 v = _mm256_broadcast_ss(x + r * K + k);
#pragma GCC unroll 8
            for (int j = 0; j < 2 * J; ++j) acc[r][j] = _mm256_fmadd_ps(v, w[j], acc[r][j]);
        }
    }
    if (scale != nullptr) {
#pragma GCC unroll 8
        for (int j = 0; j < 2 * J; ++j) {
            const __m256 s = _mm256_loadu_ps(scale + 8 * j);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[r][j] = _mm256_mul_ps(acc[r][j], s);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) {
            float* out = y + r * ldy + j * kPanel;
            const int64_t left = cols - j * kPanel;
            if (left >= kPanel) {
                _mm256_storeu_ps(out, acc[r][2 * j]);
                _mm256_storeu_ps(out + 8, acc[r][2 * j + 1]);
            } else {
                alignas(32) float tmp[kPanel];
                _mm256_store_ps(tmp, acc[r][2 * j]);
                _mm256_store_ps(tmp + 8, acc[r][2 * j + 1]);
                for (int64_t i = 0; i < left; ++i) out[i] = tmp[i];
            }
        }
    }
}

template <int J, typename T>
inline void rows_through(int64_t rows, const float* x, int64_t K, const T* panel, const float* scale, float* y,
                         int64_t ldy, int64_t cols) {
    switch (rows) {
        case 6: block<6, J>(x, K, panel, scale, y, ldy, cols); break;
        case 5: block<5, J>(x, K, panel, scale, y, ldy, cols); break;
        case 4: block<4, J>(x, K, panel, scale, y, ldy, cols); break;
        case 3: block<3, J>(x, K, panel, scale, y, ldy, cols); break;
        case 2: block<2, J>(x, K, panel, scale, y, ldy, cols); break;
        default: block<1, J>(x, K, panel, scale, y, ldy, cols); break;
    }
}

// panels [first, last) of the product; y points at the first's outputs, rows ldy apart
template <typename T>
void panels_through(const float* x, int64_t M, int64_t K, const T* P, const float* scales, int64_t N, float* y,
                    int64_t ldy, int64_t first, int64_t last) {
    // rows in blocks of near-equal size, at most 6 (8 rows: 4 + 4, not 6 + 2); 4 rows as 2 + 2, whose blocks take
    // 3 panels each: 21-22 ms against 24-26 as one block over 8 medium layers (benchmarks/RESULTS.md, session 26)
    const int64_t most_rows = M == 4 ? 2 : kMaxRows;
    const int64_t blocks = (M + most_rows - 1) / most_rows;
    const int64_t most = M / blocks + (M % blocks ? 1 : 0);
    const int64_t group = most == 1 ? 4 : most == 2 ? 3 : most == 3 ? 2 : 1;  // panels taken at once
    for (int64_t p = first; p < last;) {
        const int64_t take = p + group <= last ? group : 1;
        const T* panel = P + p * K * kPanel;
        const float* scale = scales == nullptr ? nullptr : scales + p * kPanel;
        const int64_t cols = N - p * kPanel;
        int64_t row = 0;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t rows = M / blocks + (b < M % blocks ? 1 : 0);
            const float* xb = x + row * K;
            float* yb = y + row * ldy + (p - first) * kPanel;
            switch (take) {
                case 4: rows_through<4>(rows, xb, K, panel, scale, yb, ldy, cols); break;
                case 3: rows_through<3>(rows, xb, K, panel, scale, yb, ldy, cols); break;
                case 2: rows_through<2>(rows, xb, K, panel, scale, yb, ldy, cols); break;
                default: rows_through<1>(rows, xb, K, panel, scale, yb, ldy, cols); break;
            }
            row += rows;
        }
        p += take;
    }
}

template <typename T>
void gemm(const float* x, int64_t M, int64_t K, const T* P, const float* scales, int64_t N, float* y,
          int64_t threads) {
    const int64_t panels = (N + kPanel - 1) / kPanel;
    if (threads <= 1) {
        panels_through(x, M, K, P, scales, N, y, N, 0, panels);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t t = 0; t < threads; ++t) {
        const int64_t first = panels * t / threads, last = panels * (t + 1) / threads;
        panels_through(x, M, K, P, scales, N, y + first * kPanel, N, first, last);
    }
}

}  // namespace

// y is [M, N]; with threads > 1 the panels are split into that many contiguous runs, one per OpenMP thread
// (torch's own OpenMP runtime: the library links libgomp.so.1, which torch has loaded already)
extern "C" void swarmllm_panel_gemm(const float* x, int64_t M, int64_t K, const float* P, int64_t N, float* y,
                                    int64_t threads) {
    gemm(x, M, K, P, nullptr, N, y, threads);
}

// the same for int8 codes; scales: one per output, padded with the panels to a multiple of 16
extern "C" void swarmllm_panel_gemm_int8(const float* x, int64_t M, int64_t K, const int8_t* P,
                                         const float* scales, int64_t N, float* y, int64_t threads) {
    gemm(x, M, K, P, scales, N, y, threads);
}

// the same for bfloat16 and float16 weights (their bits)
extern "C" void swarmllm_panel_gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* P, int64_t N,
                                         float* y, int64_t threads) {
    gemm(x, M, K, reinterpret_cast<const bfloat16*>(P), nullptr, N, y, threads);
}

extern "C" void swarmllm_panel_gemm_f16(const float* x, int64_t M, int64_t K, const uint16_t* P, int64_t N,
                                        float* y, int64_t threads) {
    gemm(x, M, K, reinterpret_cast<const float16*>(P), nullptr, N, y, threads);
}
