// The bilinear read of one sampling point and its backward, written once for the CPU and CUDA kernels.
//
// Convention (Deformable-DETR == grid_sample(align_corners=False, padding_mode="zeros")): the
// normalised location (x, y) on an H x W level reads the pixel-space point
// (x * W - 0.5, y * H - 0.5); the four integer neighbours are interpolated bilinearly and
// neighbours outside the level count as zero. A point a full pixel or more outside reads zero and
// gets zero gradient.
//
// All arithmetic is done in acc_t (float for fp16/bf16/fp32 values, double for fp64); values are
// converted on load. Per-level pixel indices are int32 (a level has far fewer than 2^31 pixels);
// offsets into the whole value tensor are int64 in the callers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#define MSDA_UNROLL _Pragma("unroll")
// bilinear_backward is __host__ __device__ but is handed a device-only atomicAdd functor on the GPU.
#define MSDA_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define MSDA_HOST_DEVICE inline
#define MSDA_UNROLL
#define MSDA_EXEC_CHECK_DISABLE
#endif

// A sum over channels is a reduction the compiler may not reorder on its own; on the CPU, OpenMP's
// simd pragma allows it, which vectorises the channel loops (the order of a float sum changes).
#if defined(_OPENMP) && !defined(__CUDACC__)
#define MSDA_PRAGMA(x) _Pragma(#x)
#define MSDA_SIMD_SUM(var) MSDA_PRAGMA(omp simd reduction(+ : var))
#else
#define MSDA_SIMD_SUM(var)
#endif

// Accumulators and gradient buffers never alias the tensors read alongside them; saying so lets the
// compiler keep values in registers and vectorise the channel loops.
#define MSDA_RESTRICT __restrict__

namespace lt_distill {
namespace msda {

// The four neighbours of a sampling point, in the order (top, left), (top, right), (bottom, left),
// (bottom, right). index[k] is the pixel index h * W + w inside the level, or -1 when that
// neighbour lies outside the level (it then contributes nothing).
template <typename acc_t>
struct BilinearTap {
  int32_t index[4];
  acc_t weight[4];
  acc_t frac_h;  // distance below the top row, in [0, 1)
  acc_t frac_w;  // distance right of the left column, in [0, 1)
};

// Prepares the bilinear read of the normalised location (x, y) on a height x width level.
// Returns false when no neighbour is inside the level; the point then contributes nothing
// (also for NaN locations, which fail every comparison).
template <typename acc_t>
MSDA_HOST_DEVICE bool bilinear_setup(acc_t x, acc_t y, int32_t height, int32_t width, BilinearTap<acc_t>& tap) {
  const acc_t h_im = y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  const acc_t w_im = x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  // Non-short-circuit & throughout: this runs for every sampling point, and compiles to
  // compares and selects instead of hard-to-predict branches.
  const bool inside = (h_im > static_cast<acc_t>(-1)) & (w_im > static_cast<acc_t>(-1)) &
                      (h_im < static_cast<acc_t>(height)) & (w_im < static_cast<acc_t>(width));
  if (!inside) {
    return false;
  }
  // floor() by truncation: h_im + 1 > 0 here.
  const int32_t h_low = static_cast<int32_t>(h_im + static_cast<acc_t>(1)) - 1;
  const int32_t w_low = static_cast<int32_t>(w_im + static_cast<acc_t>(1)) - 1;
  const acc_t lh = h_im - static_cast<acc_t>(h_low);
  const acc_t lw = w_im - static_cast<acc_t>(w_low);
  const acc_t hh = static_cast<acc_t>(1) - lh;
  const acc_t hw = static_cast<acc_t>(1) - lw;
  const bool top = h_low >= 0;
  const bool bottom = h_low + 1 < height;
  const bool left = w_low >= 0;
  const bool right = w_low + 1 < width;
  const int32_t top_left = h_low * width + w_low;
  tap.index[0] = (top & left) ? top_left : -1;
  tap.index[1] = (top & right) ? top_left + 1 : -1;
  tap.index[2] = (bottom & left) ? top_left + width : -1;
  tap.index[3] = (bottom & right) ? top_left + width + 1 : -1;
  tap.weight[0] = hh * hw;
  tap.weight[1] = hh * lw;
  tap.weight[2] = lh * hw;
  tap.weight[3] = lh * lw;
  tap.frac_h = lh;
  tap.frac_w = lw;
  return true;
}

// Forward for channels c0, c0 + step, ..., c0 + (count - 1) * step of one sampling point:
//   acc[j] += scale * interpolated value of channel c0 + j * step.
// `level` points at channel 0 of pixel 0 of this level for the current (batch, head);
// consecutive pixels are pixel_stride elements apart. The CPU passes all channels (step 1, a loop
// the compiler vectorises); a CUDA lane passes the channels it owns.
template <typename scalar_t, typename acc_t>
MSDA_HOST_DEVICE void bilinear_gather(const scalar_t* MSDA_RESTRICT level, int64_t pixel_stride,
                                      const BilinearTap<acc_t>& tap, acc_t scale, int32_t c0, int32_t count,
                                      int32_t step, acc_t* MSDA_RESTRICT acc) {
  MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (tap.index[k] >= 0) {
      const scalar_t* corner = level + tap.index[k] * pixel_stride + c0;
      const acc_t w = scale * tap.weight[k];
      for (int32_t j = 0; j < count; ++j) {
        acc[j] += w * static_cast<acc_t>(corner[j * step]);
      }
    }
  }
}

// Gradients of one sampling point from the channels c0 + j * step (j < count), given
// grad[j * step] = dL/d(output channel c0 + j * step) and the point's attention weight:
//   returns dL/d(attention weight) and dL/d(x), dL/d(y) of the normalised location (partial sums
//   over these channels: they add up across channel ranges), and
//   adds attention * weight_k * grad to the four neighbours in grad_level with add(address, amount):
//   a plain += on the CPU, where each task owns its part of grad_level, atomicAdd on the GPU.
// grad_level is laid out like `level`. Uses the per-neighbour dot products
// s_k = sum_c grad[c] * value_k[c]: the sample is sum_k weight_k * value_k, and the weights are
// bilinear in the fractional position.
template <typename acc_t>
struct PointGrad {
  acc_t attention;
  acc_t x;
  acc_t y;
};

MSDA_EXEC_CHECK_DISABLE
template <typename scalar_t, typename acc_t, typename AddOp>
MSDA_HOST_DEVICE PointGrad<acc_t> bilinear_backward(const scalar_t* MSDA_RESTRICT level,
                                                    acc_t* MSDA_RESTRICT grad_level, int64_t pixel_stride,
                                                    const BilinearTap<acc_t>& tap, int32_t height, int32_t width,
                                                    acc_t attention, const scalar_t* MSDA_RESTRICT grad,
                                                    int32_t c0, int32_t count, int32_t step, AddOp add) {
  acc_t dot[4];
  MSDA_UNROLL
  for (int k = 0; k < 4; ++k) {
    acc_t sum = 0;
    if (tap.index[k] >= 0) {
      const int64_t offset = tap.index[k] * pixel_stride + c0;
      const scalar_t* corner = level + offset;
      acc_t* grad_corner = grad_level + offset;
      const acc_t w = attention * tap.weight[k];
      MSDA_SIMD_SUM(sum)
      for (int32_t j = 0; j < count; ++j) {
        const acc_t g = static_cast<acc_t>(grad[j * step]);
        sum += g * static_cast<acc_t>(corner[j * step]);
        add(grad_corner + j * step, w * g);
      }
    }
    dot[k] = sum;
  }
  const acc_t lh = tap.frac_h;
  const acc_t lw = tap.frac_w;
  const acc_t hh = static_cast<acc_t>(1) - lh;
  const acc_t hw = static_cast<acc_t>(1) - lw;
  PointGrad<acc_t> out;
  out.attention = tap.weight[0] * dot[0] + tap.weight[1] * dot[1] + tap.weight[2] * dot[2] + tap.weight[3] * dot[3];
  // d(sample)/d(frac_w) and d(frac_h), times d(pixel)/d(normalised) = W (resp. H).
  out.x = attention * static_cast<acc_t>(width) * (hh * (dot[1] - dot[0]) + lh * (dot[3] - dot[2]));
  out.y = attention * static_cast<acc_t>(height) * (hw * (dot[2] - dot[0]) + lw * (dot[3] - dot[1]));
  return out;
}

}  // namespace msda
}  // namespace lt_distill
