// y[M, N] = x[M, K] W^T for a weight stored as panels of 16 outputs, P[N / 16][K][16] (the last panel
// zero-padded), float32 inputs and sums, with AVX2, FMA and F16C, or AVX-512 where the library is built for it
// (swarmllm/models/panels.py builds one library per instruction set). The weight is float32, bfloat16, float16, or
// int8 codes with one float32 scale per output (W = codes * scales, row-wise); each is widened to float32 in
// registers. nf4 weights have panels of their own layout (see nf4_panels_through). Built and loaded by
// swarmllm/models/panels.py, which says why.
//
// The weight is read once per call, front to back, whatever M. Rows go through it in blocks of at most 6 (AVX2)
// or 8 (AVX-512), and a block of few rows takes several panels at once: the rows x panels accumulators (two AVX2
// registers a panel, one AVX-512 register) stay within 12 of AVX2's 16 registers or 24 of AVX-512's 32, and
// enough independent FMA chains and weight streams are in flight to keep up with memory (one row alone through
// one panel would leave the FMA units waiting on its chains); a block of one panel at a time prefetches the next.
// The first block of rows streams the panels from memory, the others find them in L2. Each output is one float32
// FMA chain over k in order (then scaled, for int8), so a row's result does not depend on the rows that share its
// call, nor on the instruction set: the AVX2 and the AVX-512 library give the same bits.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int kPanel = 16;
constexpr int kMaxRows = 6;
// A block of several panels asks for each one's weights kAhead inputs before it reads them (a prefetch; one panel
// asks for the next panel's instead, a whole panel ahead). With several rows a k's FMAs take long enough that the
// hardware's own prefetch fell behind, and the read and the FMAs ran one after the other: 8 medium layers, one
// AVX-512 thread, 8 rows 32.8 ms -> 26.4, 16 rows 44.3 -> 35.6, 2 rows 27.1 -> 24.3; the AVX2 build's 4 rows
// 39.9 -> 31.1; bfloat16 8 rows 21.8 -> 17.4, int8 14.3 -> 12.9, nf4 1 row 10.3 -> 8.9 (benchmarks/RESULTS.md).
constexpr int64_t kAhead = 32;

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

template <int R, int J>
inline void store(__m256 (&acc)[R][2 * J], float* y, int64_t ldy, int64_t cols);

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
        } else {  // several: ask for each one's row kAhead inputs on
#pragma GCC unroll 8
            for (int j = 0; j < J; ++j) {
                _mm_prefetch(reinterpret_cast<const char*>(panel + j * stride + (k + kAhead) * kPanel), _MM_HINT_T0);
            }
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
    store<R, J>(acc, y, ldy, cols);
}

// R rows' sums through J panels into y; cols: the outputs left from the first panel (the last may be padded)
template <int R, int J>
inline void store(__m256 (&acc)[R][2 * J], float* y, int64_t ldy, int64_t cols) {
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

// f(std::integral_constant<int, R>) for R = min(rows, Max), at least 1: a block's row count as a template argument
template <int Max, typename F>
inline void with_rows(int64_t rows, F f) {
    if constexpr (Max > 1) {
        if (rows < Max) return with_rows<Max - 1>(rows, f);
    }
    f(std::integral_constant<int, Max>{});
}

// f(std::integral_constant<int, J>) for the J of Js equal to n, else for 1: a block's panel count as a template
// argument
template <int... Js, typename F>
inline void with_panels(int64_t n, F f) {
    if (!((n == Js && (f(std::integral_constant<int, Js>{}), true)) || ...)) f(std::integral_constant<int, 1>{});
}

template <int J, typename T>
inline void rows_through(int64_t rows, const float* x, int64_t K, const T* panel, const float* scale, float* y,
                         int64_t ldy, int64_t cols) {
    with_rows<kMaxRows>(rows, [&](auto r) { block<decltype(r)::value, J>(x, K, panel, scale, y, ldy, cols); });
}

#if defined(__AVX512F__)
// The same with AVX-512: a panel's 16 weights at one input k are one register, so a block holds up to 8 rows x 3
// panels of accumulators (or 1 row x 8, 2 x 6). Each output's FMA chain is the AVX2 one's, lane for lane.
constexpr int kMaxRows512 = 8;

inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const int8_t* w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
inline __m512 load16(const bfloat16* w) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const float16* w) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// J consecutive panels of a weight of type T, as AVX-512 registers of 16 weights at an input k
template <typename T>
struct Panels512 {
    const T* first;
    int64_t stride;  // K * kPanel: from a panel to the next
    const T* row(int j, int64_t k) const { return first + j * stride + k * kPanel; }  // panel j's weights at k
    __m512 at(int j, int64_t k) const { return load16(row(j, k)); }
    const void* next(int64_t k) const { return row(1, k); }  // the next panel's, to prefetch
};

// R rows through the J panels of `source` (Panels512, Nf4Panels512); scale: the first's output scales (int8), or
// null
template <int R, int J, typename Source>
inline void block512(const float* x, int64_t K, const Source& source, const float* scale, float* y, int64_t ldy,
                     int64_t cols) {
    __m512 acc[R][J];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; ++k) {
        __m512 w[J];
        if (J == 1) {
            _mm_prefetch(reinterpret_cast<const char*>(source.next(k)), _MM_HINT_T0);
        } else {
#pragma GCC unroll 8
            for (int j = 0; j < J; ++j) {
                _mm_prefetch(reinterpret_cast<const char*>(source.row(j, k + kAhead)), _MM_HINT_T0);
            }
        }
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) w[j] = source.at(j, k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m512 v = _mm512_set1_ps(x[r * K + k]);
#pragma GCC unroll 8
            for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(v, w[j], acc[r][j]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
        const __m512 s = scale != nullptr ? _mm512_loadu_ps(scale + kPanel * j) : _mm512_setzero_ps();
        const int64_t left = cols - j * kPanel;
        const __mmask16 mask = left >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m512 out = scale != nullptr ? _mm512_mul_ps(acc[r][j], s) : acc[r][j];
            _mm512_mask_storeu_ps(y + r * ldy + j * kPanel, mask, out);
        }
    }
}

template <int J, typename T>
inline void rows_through512(int64_t rows, const float* x, int64_t K, const T* panel, const float* scale,
                            float* y, int64_t ldy, int64_t cols) {
    const Panels512<T> source{panel, K * kPanel};
    with_rows<kMaxRows512>(rows, [&](auto r) {
        block512<decltype(r)::value, J>(x, K, source, scale, y, ldy, cols);
    });
}

#endif

// panels [first, last) of the product; y points at the first's outputs, rows ldy apart. Rows go in blocks of
// near-equal size, at most `most_rows`, each block through `group` panels at once: through(take, rows, x, panel,
// scale, y, cols) runs `rows` rows through `take` panels.
template <typename T, typename Through>
void walk(const float* x, int64_t M, int64_t K, const T* P, const float* scales, int64_t N, float* y, int64_t ldy,
          int64_t first, int64_t last, int64_t most_rows, int64_t (*group_for)(int64_t), Through through) {
    const int64_t blocks = (M + most_rows - 1) / most_rows;
    const int64_t group = group_for(M / blocks + (M % blocks ? 1 : 0));  // by the largest block's rows
    for (int64_t p = first; p < last;) {
        const int64_t take = p + group <= last ? group : 1;
        const T* panel = P + p * K * kPanel;
        const float* scale = scales == nullptr ? nullptr : scales + p * kPanel;
        const int64_t cols = N - p * kPanel;
        int64_t row = 0;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t rows = M / blocks + (b < M % blocks ? 1 : 0);
            through(take, rows, x + row * K, panel, scale, y + row * ldy + (p - first) * kPanel, cols);
            row += rows;
        }
        p += take;
    }
}

template <typename T>
void panels_through(const float* x, int64_t M, int64_t K, const T* P, const float* scales, int64_t N, float* y,
                    int64_t ldy, int64_t first, int64_t last) {
#if defined(__AVX512F__)
    // panels at once: 8 for 1 row, 6 for 2, 4 up to 4 rows, else 3 (8 medium layers, one thread: 8 rows 29 ms
    // against 32 for 2 panels; int8, 1 row 7.4 ms against 8.0 for 4 panels, float32 even, the weights' read bound)
    const auto group = [](int64_t most) -> int64_t { return most <= 1 ? 8 : most <= 2 ? 6 : most <= 4 ? 4 : 3; };
    walk(x, M, K, P, scales, N, y, ldy, first, last, kMaxRows512, +group,
         [&](int64_t take, int64_t rows, const float* xb, const T* panel, const float* scale, float* yb,
             int64_t cols) {
             with_panels<8, 6, 4, 3>(take, [&](auto j) {
                 rows_through512<decltype(j)::value>(rows, xb, K, panel, scale, yb, ldy, cols);
             });
         });
#else
    // at most 6 rows a block (8 rows: 4 + 4, not 6 + 2); 4 rows as 2 + 2, whose blocks take 3 panels each: 21-22 ms
    // against 24-26 as one block over 8 medium layers (benchmarks/RESULTS.md, session 26)
    const auto group = [](int64_t most) -> int64_t { return most == 1 ? 4 : most == 2 ? 3 : most == 3 ? 2 : 1; };
    walk(x, M, K, P, scales, N, y, ldy, first, last, M == 4 ? 2 : kMaxRows, +group,
         [&](int64_t take, int64_t rows, const float* xb, const T* panel, const float* scale, float* yb,
             int64_t cols) {
             with_panels<4, 3, 2>(take, [&](auto j) {
                 rows_through<decltype(j)::value>(rows, xb, K, panel, scale, yb, ldy, cols);
             });
         });
#endif
}

// run(first, last) over the N outputs' panels, split into `threads` contiguous runs, one per OpenMP thread
template <typename F>
void over_threads(int64_t N, int64_t threads, F run) {
    const int64_t panels = (N + kPanel - 1) / kPanel;
    if (threads <= 1) {
        run(0, panels);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t t = 0; t < threads; ++t) run(panels * t / threads, panels * (t + 1) / threads);
}

template <typename T>
void gemm(const float* x, int64_t M, int64_t K, const T* P, const float* scales, int64_t N, float* y,
          int64_t threads) {
    over_threads(N, threads, [&](int64_t first, int64_t last) {
        panels_through(x, M, K, P, scales, N, y + first * kPanel, N, first, last);
    });
}

// nf4: each panel's codes are [K][8] bytes, byte i holding output i's 4-bit code in its low half and output
// i + 8's in its high half; absmax: [K / 64][16] floats per panel (one per output and block of 64 inputs, as
// bitsandbytes' blocks of 64 along each row); table: the 16 nf4 values. A weight is table[code] * absmax, made in
// registers (two permutes and a blend look the code up) and then summed as a float32 weight's would be: the
// product is a float32 panel product of the dequantized weight, bit for bit.
constexpr int64_t kNf4Block = 64;

// the nf4 values of 8 codes, each in the low 4 bits of a 32-bit lane (the bits above are ignored)
inline __m256 nf4_lookup(__m256i code, __m256 low, __m256 high) {
    const __m256 a = _mm256_permutevar8x32_ps(low, code), b = _mm256_permutevar8x32_ps(high, code);  // bits 0-2
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  // code's bit 3 selects
}

// the 16 weights of an nf4 panel at one input k: its 8 bytes of codes, their outputs' absmaxes (lo: outputs 0-7)
inline void nf4_weights(const uint8_t* bytes, __m256 scale_lo, __m256 scale_hi, __m256 low, __m256 high,
                        __m256& lo, __m256& hi) {
    const __m256i both = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    lo = _mm256_mul_ps(nf4_lookup(both, low, high), scale_lo);
    hi = _mm256_mul_ps(nf4_lookup(_mm256_srli_epi32(both, 4), low, high), scale_hi);
}

// use(k, lo, hi) for each input k of one nf4 panel, with its 16 weights made in registers
template <typename F>
inline void nf4_each(int64_t K, const uint8_t* codes, const float* absmax, __m256 low, __m256 high, F use) {
    for (int64_t k0 = 0; k0 < K; k0 += kNf4Block) {
        const float* s = absmax + k0 / kNf4Block * kPanel;
        const __m256 scale_lo = _mm256_loadu_ps(s), scale_hi = _mm256_loadu_ps(s + 8);
        for (int64_t k = k0; k < k0 + kNf4Block; ++k) {
            __m256 lo, hi;
            nf4_weights(codes + k * 8, scale_lo, scale_hi, low, high, lo, hi);
            use(k, lo, hi);
        }
    }
}

#if defined(__AVX512F__)
// J consecutive nf4 panels as AVX-512 registers of 16 weights at an input k: the 8 bytes of codes widened to 16
// lanes (bytes 0-7: outputs 0-7 in their low halves; then the same bytes shifted down 4 bits: outputs 8-15), one
// permute looks the 16 codes up (it reads each lane's low 4 bits), times their absmaxes: the AVX2 weights' values
struct Nf4Panels512 {
    const uint8_t* codes;
    const float* absmax;
    int64_t K, scale_stride;
    __m512 table;
    __m512 at(int j, int64_t k) const {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row(j, k)));
        const __m512i both = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(bytes, _mm_srli_epi16(bytes, 4)));
        const __m512 scale = _mm512_loadu_ps(absmax + j * scale_stride + k / kNf4Block * kPanel);
        return _mm512_mul_ps(_mm512_permutexvar_ps(both, table), scale);
    }
    const uint8_t* row(int j, int64_t k) const { return codes + (j * K + k) * 8; }  // panel j's codes at k
    const void* next(int64_t k) const { return row(1, k); }
};
#endif

// R rows (at most 4: the lookups take registers) through one nf4 panel, its weights made in registers
template <int R>
inline void nf4_block(const float* x, int64_t K, const uint8_t* codes, const float* absmax, __m256 low, __m256 high,
                      float* y, int64_t ldy, int64_t cols) {
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    nf4_each(K, codes, absmax, low, high, [&](int64_t k, __m256 lo, __m256 hi) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 v = _mm256_broadcast_ss(x + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(v, lo, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(v, hi, acc[r][1]);
        }
    });
    store<R, 1>(acc, y, ldy, cols);
}

inline void nf4_rows(int64_t rows, const float* x, int64_t K, const uint8_t* codes, const float* absmax,
                     __m256 low, __m256 high, float* y, int64_t ldy, int64_t cols) {
    with_rows<4>(rows, [&](auto r) {
        nf4_block<decltype(r)::value>(x, K, codes, absmax, low, high, y, ldy, cols);
    });
}

// nf4 panels [first, last). Up to 4 rows make the weights in registers, a panel at a time (a lone row through 2
// panels at a time was 7-10% slower: the lookups bound it, not memory). More rows make each panel once, into a
// float32 panel in L2 that the float32 blocks read (making the weights is most of the work: once per block of 4
// rows cost 1.2x float32's time for 8 rows, once per call 0.95x).
void nf4_panels_through(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* absmax,
                        const float* table, int64_t N, float* y, int64_t ldy, int64_t first, int64_t last) {
    const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    const int64_t scale_stride = K / kNf4Block * kPanel;
#if defined(__AVX512F__)
    // one lookup makes a panel's 16 weights: up to 32 rows make them in registers, once per block of up to 8 rows
    // (8 medium layers, one thread: 1 row 8.8 ms against the AVX2 build's 25.5, 8 rows 12.7 against 29.5, 16 rows
    // 27.3 against 39.9 through a float32 panel; 64 rows even)
    if (M <= 32) {
        const __m512 table16 = _mm512_loadu_ps(table);
        const int64_t group = M <= 2 ? 2 : 1;  // panels at once
        const int64_t blocks = (M + kMaxRows512 - 1) / kMaxRows512;
        for (int64_t p = first; p < last;) {
            const int64_t take = p + group <= last ? group : 1;
            const Nf4Panels512 source{codes + p * K * 8, absmax + p * scale_stride, K, scale_stride, table16};
            int64_t row = 0;
            for (int64_t b = 0; b < blocks; ++b) {
                const int64_t rows = M / blocks + (b < M % blocks ? 1 : 0);
                const float* xb = x + row * K;
                float* yb = y + row * ldy + (p - first) * kPanel;
                with_rows<kMaxRows512>(rows, [&](auto r) {
                    with_panels<2>(take, [&](auto j) {
                        block512<decltype(r)::value, decltype(j)::value>(xb, K, source, nullptr, yb, ldy,
                                                                          N - p * kPanel);
                    });
                });
                row += rows;
            }
            p += take;
        }
        return;
    }
#endif
    if (M > 4) {
        std::vector<float> panel(K * kPanel);
        for (int64_t p = first; p < last; ++p) {
            float* made = panel.data();
            const auto keep = [&](int64_t k, __m256 lo, __m256 hi) {
                _mm256_storeu_ps(made + k * kPanel, lo);
                _mm256_storeu_ps(made + k * kPanel + 8, hi);
            };
            nf4_each(K, codes + p * K * 8, absmax + p * scale_stride, low, high, keep);
            panels_through(x, M, K, panel.data(), nullptr, N - p * kPanel, y + (p - first) * kPanel, ldy, 0, 1);
        }
        return;
    }
    for (int64_t p = first; p < last; ++p) {
        nf4_rows(M, x, K, codes + p * K * 8, absmax + p * scale_stride, low, high, y + (p - first) * kPanel, ldy,
                 N - p * kPanel);
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

// nf4 codes and absmaxes as panels (see nf4_panels_through); K a multiple of 64
extern "C" void swarmllm_panel_gemm_nf4(const float* x, int64_t M, int64_t K, const uint8_t* codes,
                                        const float* absmax, const float* table, int64_t N, float* y,
                                        int64_t threads) {
    over_threads(N, threads, [&](int64_t first, int64_t last) {
        nf4_panels_through(x, M, K, codes, absmax, table, N, y + first * kPanel, N, first, last);
    });
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
