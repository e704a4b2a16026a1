#include <immintrin.h>
#include <omp.h>
// x: padded input (N, C, H+2, W+2) fp32 ; w: (OC, C, 3, 3) ; b: (OC) ; y: (N, OC, H, W). W % 16 == 0. C = OC = 8.
void conv8_fwd(const float* x, const float* w, const float* b, float* y, int N, int H, int W) {
    const int C = 8, OC = 8, WP = W + 2, HP = H + 2;
    #pragma omp parallel for schedule(static)
    for (int nh = 0; nh < N * H; ++nh) {
        int n = nh / H, h = nh % H;
        for (int w0 = 0; w0 < W; w0 += 16) {
            __m512 acc[8];
            for (int o = 0; o < OC; ++o) acc[o] = _mm512_set1_ps(b[o]);
            for (int c = 0; c < C; ++c)
                for (int kh = 0; kh < 3; ++kh) {
                    const float* row = x + (((long)n * C + c) * HP + h + kh) * WP + w0;
                    for (int kw = 0; kw < 3; ++kw) {
                        __m512 xv = _mm512_loadu_ps(row + kw);
                        const float* wp = w + c * 9 + kh * 3 + kw;
                        #pragma GCC unroll 8
                        for (int o = 0; o < OC; ++o) acc[o] = _mm512_fmadd_ps(xv, _mm512_set1_ps(wp[o * C * 9]), acc[o]);
                    }
                }
            for (int o = 0; o < OC; ++o) _mm512_storeu_ps(y + (((long)n * OC + o) * H + h) * W + w0, acc[o]);
        }
    }
}

void conv8_fwd2(const float* x, const float* w, const float* b, float* y, int N, int H, int W) {
    const int C = 8, OC = 8, WP = W + 2, HP = H + 2;
    #pragma omp parallel for schedule(static)
    for (int nh = 0; nh < N * H; ++nh) {
        int n = nh / H, h = nh % H;
        for (int w0 = 0; w0 < W; w0 += 32) {
            __m512 acc[8], acd[8];
            for (int o = 0; o < OC; ++o) acd[o] = acc[o] = _mm512_set1_ps(b[o]);
            for (int c = 0; c < C; ++c)
                for (int kh = 0; kh < 3; ++kh) {
                    const float* row = x + (((long)n * C + c) * HP + h + kh) * WP + w0;
                    for (int kw = 0; kw < 3; ++kw) {
                        __m512 xv = _mm512_loadu_ps(row + kw), xw = _mm512_loadu_ps(row + kw + 16);
                        const float* wp = w + c * 9 + kh * 3 + kw;
                        #pragma GCC unroll 8
                        for (int o = 0; o < OC; ++o) { __m512 wv = _mm512_set1_ps(wp[o * C * 9]); acc[o] = _mm512_fmadd_ps(xv, wv, acc[o]); acd[o] = _mm512_fmadd_ps(xw, wv, acd[o]); }
                    }
                }
            for (int o = 0; o < OC; ++o) { _mm512_storeu_ps(y + (((long)n * OC + o) * H + h) * W + w0, acc[o]); _mm512_storeu_ps(y + (((long)n * OC + o) * H + h) * W + w0 + 16, acd[o]); }
        }
    }
}
