// The Llama-family decoder forward on the CPU in one native call per engine step: every layer's norms,
// GGUF-block products, rotary embedding, K/V store into the engine's paged cache, attention and MLP,
// with no Python or torch dispatch between them. The same equations as servelm/engine/models/llama.py
// (deferred residual add included); the packed batch is the runner's (prefills first, then decodes).
//
// Every token row is computed by code whose operations do not depend on the other rows (products by
// slk_matmul, attention per token and KV head), so a row's result is the same bitwise whatever the batch.
#include "kernels.cpp"

namespace {

inline float dot_f(const float* a, const float* b, int n) {
#if defined(__AVX2__)
  if ((n & 7) == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum8(acc);
  }
#endif
  float s = 0.f;
  for (int i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

// y = w * (x / rms(x)), as F.rms_norm then the weight
inline void rms_norm(const float* x, const float* w, float* y, int n, float eps) {
  double ss = 0.0;  // a double sum: the order-independent part is the exactness, not the speed
  for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
  const float r = 1.f / std::sqrt((float)(ss / n) + eps);
  for (int i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

}  // namespace

extern "C" {

// One linear layer: up to 4 parts of GGUF blocks stacked along the output features, optional bias.
typedef struct {
  int nparts;
  int qtype[4];
  int64_t n[4];
  const uint8_t* w[4];
  const float* bias;
} slk_linear;

typedef struct {
  const float* in_norm;
  const float* post_norm;
  const float* q_norm;  // per-head RMSNorm weights (Qwen3) or null
  const float* k_norm;
  slk_linear qkv, o, gate_up, down;
  float* kv;  // [2, num_blocks, block_size, kv_heads, head_dim]
} slk_layer;

typedef struct {
  int n_layers, hidden, n_heads, n_kv_heads, head_dim, inter;
  float eps, scale;
  int64_t num_blocks;
  int block_size;
  const float* cos;  // [max_pos, head_dim]
  const float* sin_signed;  // [max_pos, head_dim], the rotate-half sign folded in
  const slk_layer* layers;
  const float* final_norm;
} slk_model;

static int linear(const slk_linear& l, const float* x, int64_t t, int64_t k, float* out, int64_t ldo) {
  int64_t col = 0;
  for (int p = 0; p < l.nparts; p++) {
    if (slk_matmul(x, t, l.w[p], l.qtype[p], l.n[p], k, out + col, ldo) != 0) return -1;
    col += l.n[p];
  }
  if (l.bias)
    for (int64_t i = 0; i < t; i++)
      for (int64_t j = 0; j < col; j++) out[i * ldo + j] += l.bias[j];
  return 0;
}

// x: [T, hidden] token embeddings in, the final normed hidden states out. positions/slots: [T].
// Sequence s owns qlens[s] consecutive rows; its context (cached + new) is ctxlens[s] tokens, its blocks
// block_tables[s * max_blocks ...]. Returns 0, or -1 if a product rejected its type.
int slk_forward(const slk_model* m, float* x, int64_t T, const int64_t* positions, const int64_t* slots,
                int nseq, const int* qlens, const int* ctxlens, const int32_t* block_tables, int max_blocks) {
  const int H = m->hidden, D = m->head_dim, NH = m->n_heads, KVH = m->n_kv_heads, I = m->inter;
  const int QS = NH * D, KS = KVH * D, QKV = QS + 2 * KS, G = NH / KVH;
  const int BS = m->block_size;
  const int64_t vstride = m->num_blocks * BS * KVH * D;  // where V starts in a layer's cache
  std::vector<float> residual((size_t)T * H), h((size_t)T * H), qkv((size_t)T * QKV), att((size_t)T * QS),
      gu((size_t)T * 2 * I), act((size_t)T * I);
  // per token: its sequence, to find the block table and the causal limit
  std::vector<int> seq_of(T), tok_ctx(T);
  {
    int64_t r = 0;
    for (int s = 0; s < nseq; s++)
      for (int j = 0; j < qlens[s]; j++, r++) { seq_of[r] = s; tok_ctx[r] = ctxlens[s] - qlens[s] + j + 1; }
  }
  const int64_t row_chunk = T >= 64 ? 8 : T;  // rows per task for the elementwise parts

  for (int L = 0; L < m->n_layers; L++) {
    const slk_layer& ly = m->layers[L];
    // stream = x (+ residual); h = norm(stream)
    parallel_chunks(T, row_chunk, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; t++) {
        float* xr = x + t * H;
        float* rr = residual.data() + t * H;
        if (L == 0) std::memcpy(rr, xr, sizeof(float) * H);
        else for (int i = 0; i < H; i++) rr[i] = xr[i] + rr[i];
        rms_norm(rr, ly.in_norm, h.data() + t * H, H, m->eps);
      }
    });
    if (linear(ly.qkv, h.data(), T, H, qkv.data(), QKV) != 0) return -1;
    // q/k norm, rotary embedding, K/V into the cache
    parallel_chunks(T, row_chunk, [&](int64_t lo, int64_t hi) {
      std::vector<float> tmp(D);
      for (int64_t t = lo; t < hi; t++) {
        float* r = qkv.data() + t * QKV;
        const float* c = m->cos + positions[t] * D;
        const float* sn = m->sin_signed + positions[t] * D;
        for (int hd = 0; hd < NH + KVH; hd++) {
          float* v = r + hd * D;  // q heads then k heads: contiguous
          if (m->layers[L].q_norm) {
            rms_norm(v, hd < NH ? ly.q_norm : ly.k_norm, tmp.data(), D, m->eps);
            std::memcpy(v, tmp.data(), sizeof(float) * D);
          }
          const int half = D / 2;
          for (int i = 0; i < D; i++) tmp[i] = v[i] * c[i] + v[i < half ? i + half : i - half] * sn[i];
          std::memcpy(v, tmp.data(), sizeof(float) * D);
        }
        float* kc = ly.kv + slots[t] * KS;
        std::memcpy(kc, r + QS, sizeof(float) * KS);
        std::memcpy(kc + vstride, r + QS + KS, sizeof(float) * KS);
      }
    });
    // attention: one task per (token, KV head), its G query heads together
    int64_t att_work = 0;  // positions attended, all tokens: short contexts run on this thread
    for (int64_t t = 0; t < T; t++) att_work += tok_ctx[t];
    parallel_chunks(T * KVH, att_work * KVH * D < (1 << 16) ? T * KVH : 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> sc;
      std::vector<float> acc(D);
      for (int64_t task = lo; task < hi; task++) {
        const int64_t t = task / KVH;
        const int kh = (int)(task % KVH);
        const int n = tok_ctx[t];
        const int32_t* table = block_tables + (int64_t)seq_of[t] * max_blocks;
        sc.resize(n);
        for (int g = 0; g < G; g++) {
          const int qh = kh * G + g;
          const float* q = qkv.data() + t * QKV + qh * D;
          float mx = -INFINITY;
          for (int p = 0; p < n; p++) {
            const float* k = ly.kv + ((int64_t)table[p / BS] * BS + p % BS) * KS + kh * D;
            sc[p] = dot_f(q, k, D) * m->scale;
            mx = std::max(mx, sc[p]);
          }
          float sum = 0.f;
          for (int p = 0; p < n; p++) { sc[p] = std::exp(sc[p] - mx); sum += sc[p]; }
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int p = 0; p < n; p++) {
            const float* v = ly.kv + vstride + ((int64_t)table[p / BS] * BS + p % BS) * KS + kh * D;
            const float w = sc[p];
            for (int i = 0; i < D; i++) acc[i] += w * v[i];
          }
          float* o = att.data() + t * QS + qh * D;
          const float inv = 1.f / sum;
          for (int i = 0; i < D; i++) o[i] = acc[i] * inv;
        }
      }
    });
    if (linear(ly.o, att.data(), T, QS, h.data(), H) != 0) return -1;
    // stream += attention; h = norm(stream)
    parallel_chunks(T, row_chunk, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; t++) {
        float* hr = h.data() + t * H;
        float* rr = residual.data() + t * H;
        for (int i = 0; i < H; i++) rr[i] = hr[i] + rr[i];
        rms_norm(rr, ly.post_norm, hr, H, m->eps);
      }
    });
    if (linear(ly.gate_up, h.data(), T, H, gu.data(), 2 * I) != 0) return -1;
    parallel_chunks(T, row_chunk, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; t++) {
        const float* g = gu.data() + t * 2 * I;
        float* a = act.data() + t * I;
        for (int i = 0; i < I; i++) a[i] = silu(g[i]) * g[I + i];
      }
    });
    if (linear(ly.down, act.data(), T, I, x, H) != 0) return -1;
  }
  parallel_chunks(T, row_chunk, [&](int64_t lo, int64_t hi) {
    std::vector<float> tmp(H);
    for (int64_t t = lo; t < hi; t++) {
      float* xr = x + t * H;
      const float* rr = residual.data() + t * H;
      for (int i = 0; i < H; i++) tmp[i] = xr[i] + rr[i];
      rms_norm(tmp.data(), m->final_norm, xr, H, m->eps);
    }
  });
  return 0;
}

}  // extern "C"
