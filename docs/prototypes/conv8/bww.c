#include <immintrin.h>
#include <omp.h>
#include <string.h>
#include <stdlib.h>
// grad_w[oc, c, kh, kw] = sum_{n,h,w} g[n,oc,h,w] * xp[n,c,h+kh,w+kw] ; xp padded (N,C,H+2,W+2); g (N,OC,H,W)
// also grad_b[oc] = sum g. C = OC = 8, W % 16 == 0.
void conv8_bww(const float* xp, const float* g, float* gw, float* gb, int N, int H, int W) {
    const int C = 8, OC = 8, WP = W + 2, HP = H + 2;
    int T = omp_get_max_threads();
    float* part = aligned_alloc(64, (size_t)T * (OC * C * 9 * 16 + OC * 16) * sizeof(float));
    #pragma omp parallel
    {
        int t = omp_get_thread_num();
        float* acc = part + (size_t)t * (OC * C * 9 * 16 + OC * 16);
        memset(acc, 0, (OC * C * 9 * 16 + OC * 16) * sizeof(float));
        #pragma omp for schedule(static)
        for (int nh = 0; nh < N * H; ++nh) {
            int n = nh / H, h = nh % H;
            for (int o = 0; o < OC; o += 2) {
                const float* g0 = g + (((long)n * OC + o) * H + h) * W;
                const float* g1 = g0 + (long)H * W;
                __m512 sb0 = _mm512_load_ps(acc + OC * C * 9 * 16 + o * 16), sb1 = _mm512_load_ps(acc + OC * C * 9 * 16 + (o + 1) * 16);
                for (int w0 = 0; w0 < W; w0 += 16) { sb0 = _mm512_add_ps(sb0, _mm512_loadu_ps(g0 + w0)); sb1 = _mm512_add_ps(sb1, _mm512_loadu_ps(g1 + w0)); }
                _mm512_store_ps(acc + OC * C * 9 * 16 + o * 16, sb0); _mm512_store_ps(acc + OC * C * 9 * 16 + (o + 1) * 16, sb1);
                for (int c = 0; c < C; ++c) {
                    float* a0 = acc + ((o * C + c) * 9) * 16;
                    float* a1 = acc + (((o + 1) * C + c) * 9) * 16;
                    __m512 s0[9], s1[9];
                    for (int k = 0; k < 9; ++k) { s0[k] = _mm512_load_ps(a0 + k * 16); s1[k] = _mm512_load_ps(a1 + k * 16); }
                    const float* xr = xp + (((long)n * C + c) * HP + h) * WP;
                    for (int w0 = 0; w0 < W; w0 += 16) {
                        __m512 gv0 = _mm512_loadu_ps(g0 + w0), gv1 = _mm512_loadu_ps(g1 + w0);
                        #pragma GCC unroll 3
                        for (int kh = 0; kh < 3; ++kh)
                            #pragma GCC unroll 3
                            for (int kw = 0; kw < 3; ++kw) {
                                __m512 xv = _mm512_loadu_ps(xr + kh * WP + w0 + kw);
                                s0[kh * 3 + kw] = _mm512_fmadd_ps(gv0, xv, s0[kh * 3 + kw]);
                                s1[kh * 3 + kw] = _mm512_fmadd_ps(gv1, xv, s1[kh * 3 + kw]);
                            }
                    }
                    for (int k = 0; k < 9; ++k) { _mm512_store_ps(a0 + k * 16, s0[k]); _mm512_store_ps(a1 + k * 16, s1[k]); }
                }
            }
        }
    }
    for (int i = 0; i < OC * C * 9; ++i) {
        float s = 0; for (int t = 0; t < T; ++t) s += _mm512_reduce_add_ps(_mm512_load_ps(part + (size_t)t * (OC * C * 9 * 16 + OC * 16) + i * 16));
        gw[i] = s;
    }
    for (int o = 0; o < OC; ++o) {
        float s = 0; for (int t = 0; t < T; ++t) s += _mm512_reduce_add_ps(_mm512_load_ps(part + (size_t)t * (OC * C * 9 * 16 + OC * 16) + OC * C * 9 * 16 + o * 16));
        gb[o] = s;
    }
    free(part);
}
