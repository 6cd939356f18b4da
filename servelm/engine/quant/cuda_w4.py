"""INT4 x BF16 products for decode batches on tensor cores: a CUDA kernel compiled at run time by NVRTC.

Why not Triton: at one row an int4 GEMV is bound by the integer work of unpacking the codes, not by
memory. The Triton kernels (triton_gemv.py) spend two integer operations per weight and reach ~40 % of
the HBM copy rate on an H200; torch's tinygemm ~44 %. This kernel spends under one: one ``lop3`` turns
two codes into two bf16 values 128 + q at once (the codes land in the low mantissa bits of 128.0), two
packed bf16 ``fma`` make them (q - 8) * scale + zero, and ``mma.sync`` multiplies. That needs PTX that
Triton does not let a kernel choose (the register layout of the tensor-core fragments), and no library
that runs on this torch/CUDA (Marlin, Machete, FBGEMM's mixed-input GEMMs) installs without a matching
build, so the kernel is ours: ~190 lines of CUDA, compiled once per process by ``torch.cuda``'s NVRTC
wrapper (no nvcc or host compiler needed; needs CUDA headers where torch looks for them).

The product is computed transposed, Y^T = W X^T, so the weight tile is the 16 x 16 ``A`` operand of
``mma.m16n8k16`` and the activations are ``B`` (8 columns: up to 8 batch rows per instruction for the
price of one; ``NB`` instructions share each decoded tile, so 16 or 32 rows cost the same weight read).
Each lane of a warp holds 8 codes of ``A``, exactly one int32 word, so the packed weight is stored in the
order the lanes consume it: [N/16 tiles][K/64 blocks][32 lanes][4 words], one 16-byte load per lane per
64 inputs, 512 contiguous bytes per warp. Inside a 64-input block the inputs are permuted (``pack``) so
that lane t needs activations 16t..16t+15: two 16-byte loads.

Work split: a warp owns one 16-row tile and a slice of K (``S`` warps per tile, summed through shared
memory at the end, so one kernel writes the output: no atomics, no zero-fill, no cast kernel); a CTA
holds ``R`` tiles.
"""
from __future__ import annotations

import threading

import torch

BLOCK_K = 64  # inputs per 16-byte load of a lane

_SRC = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
struct alignas(16) V4 { u32 x, y, z, w; };  // no CUDA headers needed: NVRTC compiles this file alone

__device__ __forceinline__ V4 ld_stream(const V4* p) {  // read once: keep it out of L1
  V4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ V4 ld_cached(const V4* p) {  // activations: read by every warp
  V4 r;
  asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 two_codes(u32 w) {  // nibbles at bits 0-3, 16-19 -> bf16x2 (128+q0, 128+q1)
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(0x43004300));
  return r;
}
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ u32 dup(u32 v, u32 sel) {  // both halves from one bf16 of v
  u32 r;
  asm("prmt.b32 %0, %1, %1, %2;" : "=r"(r) : "r"(v), "r"(sel));
  return r;
}
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u16 to_bf16(float v) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}

// One stage of a lane's stream: U 64-input blocks of weights and their (scale, zero) words for rows g, g+8.
template <int U> struct Stage { V4 w[U]; u32 lo[U], hi[U]; };

template <int U>
__device__ __forceinline__ void load_stage(Stage<U>& st, const V4* wp, const u32* SZ, int b0, int b_hi, int N,
                                           int n_lo, int gshift) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int b = b0 + u;
    if (b < b_hi) {
      st.w[u] = ld_stream(wp + (u64)b * 32);
      st.lo[u] = SZ[(u64)(b >> gshift) * N + n_lo];
      st.hi[u] = SZ[(u64)(b >> gshift) * N + n_lo + 8];
    }
  }
}

template <int NB, int U>
__device__ __forceinline__ void compute_stage(float (&acc)[NB][4], const Stage<U>& st, const u16* X, int ldx,
                                              int M, int m0, int g, int t, int b0, int b_hi) {
  const u32 ONE = 0x3F803F80u, OFF = 0xC308C308u;  // bf16x2 1.0 and -136.0 (128 + the zero point 8)
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int b = b0 + u;
    if (b < b_hi) {
      u32 xb[NB][8];  // lane (g, t): activations 16t .. 16t+15 of the block, batch rows g (+8, +16, +24)
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        const int m = m0 + j * 8 + g;
        V4 v0 = {0u, 0u, 0u, 0u}, v1 = {0u, 0u, 0u, 0u};
        if (m < M) {
          const V4* xp = (const V4*)(X + (u64)m * ldx + b * 64 + 16 * t);
          v0 = ld_cached(xp);
          v1 = ld_cached(xp + 1);
        }
        xb[j][0] = v0.x; xb[j][1] = v0.y; xb[j][2] = v0.z; xb[j][3] = v0.w;
        xb[j][4] = v1.x; xb[j][5] = v1.y; xb[j][6] = v1.z; xb[j][7] = v1.w;
      }
      const u32 s_lo = dup(st.lo[u], 0x1010), z_lo = dup(st.lo[u], 0x3232);
      const u32 s_hi = dup(st.hi[u], 0x1010), z_hi = dup(st.hi[u], 0x3232);
      const u32 words[4] = {st.w[u].x, st.w[u].y, st.w[u].z, st.w[u].w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const u32 w = words[c];
        u32 a[4];
        a[0] = fma2(fma2(two_codes(w), ONE, OFF), s_lo, z_lo);        // row g,   inputs 2t, 2t+1
        a[1] = fma2(fma2(two_codes(w >> 4), ONE, OFF), s_hi, z_hi);   // row g+8, inputs 2t, 2t+1
        a[2] = fma2(fma2(two_codes(w >> 8), ONE, OFF), s_lo, z_lo);   // row g,   inputs 2t+8, 2t+9
        a[3] = fma2(fma2(two_codes(w >> 12), ONE, OFF), s_hi, z_hi);  // row g+8, inputs 2t+8, 2t+9
#pragma unroll
        for (int j = 0; j < NB; ++j) mma(acc[j], a, xb[j][2 * c], xb[j][2 * c + 1]);
      }
    }
  }
}

// Y[M, N] (row stride ldy) = X[M, K] (row stride ldx) @ dequant(W)^T, rows m0 .. m0 + 8*NB of this pass.
// W: V4 [N/16][K/64][32]; SZ: u32 [K/G][N] = bf16 (scale, zero); w = (q - 8) * scale + zero.
// Two register stages: the loads of one are in flight while the other is multiplied.
template <int S, int R, int NB, int U>
__global__ void __launch_bounds__(32 * S * R) w4_mma(const V4* __restrict__ W, const u32* __restrict__ SZ,
    const u16* __restrict__ X, u16* __restrict__ Y, int M, int N, int K, int ldx, int ldy, int gshift) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x * R + warp / S, ks = warp % S;
  const int m0 = blockIdx.y * 8 * NB;
  const int KB = K >> 6;
  const int per = (KB + S - 1) / S;
  const int b_lo = ks * per, b_hi = KB < b_lo + per ? KB : b_lo + per;
  const bool tile_ok = tile < (N >> 4);
  const int n_lo = tile * 16 + g;
  float acc[NB][4];
#pragma unroll
  for (int j = 0; j < NB; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  if (tile_ok) {
    const V4* wp = W + (u64)tile * KB * 32 + lane;
    Stage<U> a, b;
    load_stage<U>(a, wp, SZ, b_lo, b_hi, N, n_lo, gshift);
    for (int b0 = b_lo; b0 < b_hi; b0 += 2 * U) {
      load_stage<U>(b, wp, SZ, b0 + U, b_hi, N, n_lo, gshift);
      compute_stage<NB, U>(acc, a, X, ldx, M, m0, g, t, b0, b_hi);
      load_stage<U>(a, wp, SZ, b0 + 2 * U, b_hi, N, n_lo, gshift);
      compute_stage<NB, U>(acc, b, X, ldx, M, m0, g, t, b0 + U, b_hi);
    }
  }
  if (S > 1) {  // the K slices of a tile: warps ks > 0 hand their sums to warp ks == 0
    __shared__ float red[R][S > 1 ? S - 1 : 1][NB * 4][32];
    if (ks > 0) {
#pragma unroll
      for (int j = 0; j < NB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp / S][ks - 1][j * 4 + i][lane] = acc[j][i];
    }
    __syncthreads();
    if (ks == 0) {
      for (int s = 0; s < S - 1; ++s)
#pragma unroll
        for (int j = 0; j < NB; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] += red[warp / S][s][j * 4 + i][lane];
    }
  }
  if (ks == 0 && tile_ok) {  // c0, c1: row g, columns 2t, 2t+1; c2, c3: row g+8
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int m = m0 + j * 8 + 2 * t;
      if (m < M) {
        Y[(u64)m * ldy + n_lo] = to_bf16(acc[j][0]);
        Y[(u64)m * ldy + n_lo + 8] = to_bf16(acc[j][2]);
      }
      if (m + 1 < M) {
        Y[(u64)(m + 1) * ldy + n_lo] = to_bf16(acc[j][1]);
        Y[(u64)(m + 1) * ldy + n_lo + 8] = to_bf16(acc[j][3]);
      }
    }
  }
}

// The dequantized weight, bf16 [N, K] (prefill-sized batches multiply it with cuBLAS). One thread per
// 16-byte word group: 32 codes of rows g and g+8 at inputs 16t .. 16t+15 of one 64-input block.
__global__ void w4_dequant(const V4* __restrict__ W, const u32* __restrict__ SZ, u16* __restrict__ D,
                           int N, int K, int gshift) {
  const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const int KB = K >> 6;
  if (i >= (u64)(N >> 4) * KB * 32) return;
  const int lane = i & 31, b = (i >> 5) % KB, tile = (i >> 5) / KB;
  const int g = lane >> 2, t = lane & 3, n = tile * 16 + g;
  const V4 v = W[i];
  const u32 lo = SZ[(u64)(b >> gshift) * N + n], hi = SZ[(u64)(b >> gshift) * N + n + 8];
  const u32 ONE = 0x3F803F80u, OFF = 0xC308C308u;
  const u32 words[4] = {v.x, v.y, v.z, v.w};
  u32* row_lo = (u32*)(D + (u64)n * K + b * 64 + 16 * t);
  u32* row_hi = (u32*)(D + (u64)(n + 8) * K + b * 64 + 16 * t);
#pragma unroll
  for (int c = 0; c < 4; ++c) {  // word c holds inputs 4c .. 4c+3 of the lane's 16 (see pack())
    const u32 w = words[c];
    const u32 a0 = fma2(fma2(two_codes(w), ONE, OFF), dup(lo, 0x1010), dup(lo, 0x3232));
    const u32 a1 = fma2(fma2(two_codes(w >> 4), ONE, OFF), dup(hi, 0x1010), dup(hi, 0x3232));
    const u32 a2 = fma2(fma2(two_codes(w >> 8), ONE, OFF), dup(lo, 0x1010), dup(lo, 0x3232));
    const u32 a3 = fma2(fma2(two_codes(w >> 12), ONE, OFF), dup(hi, 0x1010), dup(hi, 0x3232));
    row_lo[2 * c] = a0; row_lo[2 * c + 1] = a2;   // inputs 4c, 4c+1 | 4c+2, 4c+3
    row_hi[2 * c] = a1; row_hi[2 * c + 1] = a3;
  }
}
"""

# (S warps per tile, R tiles per CTA, U 16-byte loads per lane and register stage; two stages in flight)
DEFAULT = (4, 1, 8)
SWEEP = [(s, r, u) for s in (1, 2, 4, 8, 16) for r in (1, 2, 4) for u in (2, 4, 8) if s * r <= 16]

_KERNELS: dict[tuple[int, str], object] = {}  # (device index, kernel): a module is loaded per device
_NUM_SMS: dict[int, int] = {}
_LOCK = threading.Lock()
_FAILED: list[str] = []


def _compile(name: str):
    compile_kernel = getattr(torch.cuda, "compile_kernel", None) or getattr(torch.cuda, "_compile_kernel")
    return compile_kernel(_SRC, name)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _kernel(name: str, idx: int):
    with _LOCK:
        if (idx, name) not in _KERNELS:
            with torch.cuda.device(idx):
                _KERNELS[idx, name] = _compile(name)
        return _KERNELS[idx, name]


def _launch(name: str, device: torch.device, grid: tuple, block: tuple, args: list) -> None:
    """Launches kernel ``name`` on ``device``'s current stream (CUDA-graph capture included)."""
    idx = _index(device)
    kern = _kernel(name, idx)
    if idx == torch.cuda.current_device():
        kern(grid=grid, block=block, args=args, stream=torch.cuda.current_stream(idx))
        return
    with torch.cuda.device(idx):
        kern(grid=grid, block=block, args=args, stream=torch.cuda.current_stream(idx))


def _num_sms(device: torch.device) -> int:
    idx = _index(device)
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def available(device: torch.device) -> bool:
    """True where the kernels compile and run: a CUDA device of compute capability 8.0 or newer (bf16
    ``mma.sync``) and a torch whose NVRTC wrapper finds the CUDA headers. The first call compiles."""
    if device.type != "cuda" or _FAILED:
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        _kernel("w4_dequant", _index(device))
        return True
    except Exception as e:  # noqa: BLE001 - any compile/load failure means "not here": the caller falls back
        _FAILED.append(f"{type(e).__name__}: {e}")
        return False


def supports(n: int, k: int, group: int) -> bool:
    """Shapes the layout can hold: 16-row tiles, 64-input blocks inside one group of a power-of-two size."""
    return n % 16 == 0 and k % BLOCK_K == 0 and group % BLOCK_K == 0 and k % group == 0 and group & (group - 1) == 0


def _perm() -> tuple[list[int], ...]:
    """Axis order taking q viewed [T, h, g, KB, t, c, e] (row = 16 T + 8 h + g, input = 64 KB + 16 t + 4 c + e)
    to the packed order [T, KB, g, t, c, e', h]; e' = (0, 2, 1, 3) puts nibble p = 2 e' + h of a word where
    the kernel reads it (lop3 on bits 0-3/16-19 of w, w >> 4, w >> 8, w >> 12)."""
    return [0, 3, 2, 4, 5, 6, 1], [0, 2, 1, 3]


def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15) -> int32 [N/16, K/64, 32, 4], the order the kernel's lanes read (module doc)."""
    n, k = q.shape
    axes, e_order = _perm()
    v = q.to(torch.uint8).reshape(n // 16, 2, 8, k // 64, 4, 4, 4).permute(*axes)[..., e_order, :]
    v = v.reshape(n // 16, k // 64, 32, 4, 4, 2)  # [..., word c, byte, nibble]
    b = v[..., 0] | (v[..., 1] << 4)
    return b.contiguous().view(torch.int32).reshape(n // 16, k // 64, 32, 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 [N/16, K/64, 32, 4] -> codes [N, K] (uint8)."""
    t, kb = packed.shape[:2]
    b = packed.contiguous().view(torch.uint8).reshape(t, kb, 8, 4, 4, 4)  # [T, KB, g, t, c, byte]
    nib = torch.stack([b & 15, b >> 4], dim=-1).reshape(t, kb, 8, 4, 4, 4, 2)  # [.., e', h]
    nib = nib[..., [0, 2, 1, 3], :]  # e' -> e
    return nib.permute(0, 6, 2, 1, 3, 4, 5).reshape(t * 16, kb * 64)  # [T, h, g, KB, t, c, e]


def pick_config(n: int, k: int, m: int, num_sms: int) -> tuple[int, int, int]:
    """(S, R, U) for an [n, k] weight and m rows, from ``bench/gemv.py --sweep-cuda`` on an H100
    (docs/gpu_runs/s6/): few tiles (the 4096- and 6144-row products of an 8B model, under 8 per
    multiprocessor) split K over 8 warps; many tiles (gate_up, lm_head) over 2 (4 from 9 rows up)."""
    tiles, kb = n // 16, k // BLOCK_K
    if tiles < 8 * num_sms:
        s, r, u = 8, 1, (2 if m <= 8 else 4)
    else:
        s, r, u = (2, 2, 2) if m <= 8 else (4, 1, 2)
    while s > 1 and s > kb:  # no warp without a block of K
        s //= 2
    return s, r, u


def _x_ok(x: torch.Tensor) -> torch.Tensor:
    """Rows of x as the kernel loads them: bf16, unit stride, 16-byte aligned rows."""
    if x.dtype != torch.bfloat16:
        raise TypeError("the tensor-core int4 kernel multiplies bf16 activations")
    if x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    return x


def matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
           cfg: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] bf16 @ dequant(packed)^T -> [M, N] bf16. scales_zeros: bf16 [K/group, N, 2]. Any M: rows go
    in passes of 8, 16 or 32 that each read the weight once (prefill-sized batches: :func:`dequantize` and
    cuBLAS are faster, the caller measures)."""
    x = _x_ok(x)
    m, k = x.shape
    n = packed.shape[0] * 16
    s, r, u = cfg or pick_config(n, k, m, _num_sms(x.device))
    nb = 1 if m <= 8 else (2 if m <= 16 else 4)
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    grid = ((n // 16 + r - 1) // r, (m + 8 * nb - 1) // (8 * nb), 1)
    _launch(f"w4_mma<{s},{r},{nb},{u}>", x.device, grid, (32 * s * r, 1, 1),
            [packed, scales_zeros, x, y, m, n, k, x.stride(0), y.stride(0), (group // BLOCK_K).bit_length() - 1])
    return y


def dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The bf16 [N, K] weight the kernel multiplies by (one kernel; for prefill-sized batches)."""
    t, kb = packed.shape[:2]
    n, k = t * 16, kb * 64
    d = torch.empty(n, k, device=packed.device, dtype=torch.bfloat16)
    threads = t * kb * 32
    _launch("w4_dequant", packed.device, ((threads + 255) // 256, 1, 1), (256, 1, 1),
            [packed, scales_zeros, d, n, k, (group // BLOCK_K).bit_length() - 1])
    return d
