// lt_distill::ms_deform_attn: the CUDA kernels (the schema is defined in ms_deform_attn_cpu.cpp).
//
// Work layout: a group of G lanes (G = the next power of two >= D, at most 32, so groups never
// straddle a warp) handles one (batch, query, head) row; lane j owns channels j, j + G, ...
// The backward reduces grad_attn_weight and grad_sampling_loc of each point over the group with
// warp shuffles and writes them once (no atomics, no memset). grad_value is a scatter to
// data-dependent addresses: one fp32 atomicAdd per in-range corner and channel; the adds of a group
// hit consecutive addresses, so they coalesce into few L2 transactions.
//
// No host synchronisation and no host-side reads of device tensors: safe under CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "ms_deform_attn.h"
#include "ms_deform_attn_core.h"

namespace lt_distill {
namespace msda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr unsigned kFullMask = 0xffffffffu;

int group_size(int64_t channels) {
  int group = 1;
  while (group < channels && group < 32) {
    group *= 2;
  }
  return group;
}

int64_t num_blocks(int64_t threads) {
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: problem too large for one launch");
  return blocks;
}

template <typename acc_t>
struct AtomicAdd {
  __device__ __forceinline__ void operator()(acc_t* address, acc_t amount) const { atomicAdd(address, amount); }
};

template <typename scalar_t>
__global__ void forward_kernel(int64_t total_threads, int group, Sizes s, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ value,
                               const at::opmath_type<scalar_t>* __restrict__ loc,
                               const at::opmath_type<scalar_t>* __restrict__ attn, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= total_threads) {
    return;
  }
  const int64_t row = thread / group;  // (n, q, m)
  const int lane = static_cast<int>(thread % group);
  const int64_t n = row / (s.queries * s.heads);
  const int64_t m = row % s.heads;
  const int64_t pixel_stride = s.heads * s.channels;
  BilinearTap<acc_t> tap;
  for (int32_t c = lane; c < s.channels; c += group) {
    acc_t acc = 0;
    for (int64_t l = 0; l < s.levels; ++l) {
      const auto height = static_cast<int32_t>(__ldg(shapes + 2 * l));
      const auto width = static_cast<int32_t>(__ldg(shapes + 2 * l + 1));
      const scalar_t* level = value + ((n * s.spatial + __ldg(starts + l)) * s.heads + m) * s.channels;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t idx = (row * s.levels + l) * s.points + p;
        if (bilinear_setup(__ldg(loc + 2 * idx), __ldg(loc + 2 * idx + 1), height, width, tap)) {
          bilinear_gather(level, pixel_stride, tap, __ldg(attn + idx), c, 1, 1, &acc);
        }
      }
    }
    out[row * s.channels + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(int64_t total_threads, int group, Sizes s, const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts, const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const at::opmath_type<scalar_t>* __restrict__ loc,
                                const at::opmath_type<scalar_t>* __restrict__ attn,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                at::opmath_type<scalar_t>* __restrict__ grad_loc,
                                at::opmath_type<scalar_t>* __restrict__ grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Lanes past the end stay alive: every lane of a warp must take part in the shuffles.
  const bool active = thread < total_threads;
  const int64_t row = active ? thread / group : 0;
  const int lane = static_cast<int>(thread % group);
  const int64_t n = row / (s.queries * s.heads);
  const int64_t m = row % s.heads;
  const int64_t pixel_stride = s.heads * s.channels;
  // This lane's channels: lane, lane + group, ... (none when the group is wider than D).
  const int32_t lane_channels = lane < s.channels ? static_cast<int32_t>((s.channels - 1 - lane) / group + 1) : 0;
  const AtomicAdd<acc_t> add;
  BilinearTap<acc_t> tap;
  for (int64_t l = 0; l < s.levels; ++l) {
    const auto height = static_cast<int32_t>(__ldg(shapes + 2 * l));
    const auto width = static_cast<int32_t>(__ldg(shapes + 2 * l + 1));
    const int64_t level_offset = ((n * s.spatial + __ldg(starts + l)) * s.heads + m) * s.channels;
    for (int64_t p = 0; p < s.points; ++p) {
      const int64_t idx = (row * s.levels + l) * s.points + p;
      PointGrad<acc_t> g{0, 0, 0};
      if (active && bilinear_setup(__ldg(loc + 2 * idx), __ldg(loc + 2 * idx + 1), height, width, tap)) {
        g = bilinear_backward(value + level_offset, grad_value + level_offset, pixel_stride, tap, height, width,
                              __ldg(attn + idx), grad_out + row * s.channels + lane, lane, lane_channels, group,
                              add);
      }
      // Butterfly reduction inside each aligned group of `group` lanes.
      for (int offset = group / 2; offset > 0; offset /= 2) {
        g.attention += __shfl_xor_sync(kFullMask, g.attention, offset);
        g.x += __shfl_xor_sync(kFullMask, g.x, offset);
        g.y += __shfl_xor_sync(kFullMask, g.y, offset);
      }
      if (active && lane == 0) {
        grad_attn[idx] = g.attention;
        grad_loc[2 * idx] = g.x;
        grad_loc[2 * idx + 1] = g.y;
      }
    }
  }
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc_in,
                        const at::Tensor& attn_weight_in) {
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto sampling_loc = sampling_loc_in.contiguous();
  const auto attn_weight = attn_weight_in.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  // Every element is written by the kernel: no memset.
  auto output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  const int group = group_size(s.channels);
  const int64_t threads = s.batch * s.queries * s.heads * group;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t><<<num_blocks(threads), kThreadsPerBlock, 0, stream>>>(
        threads, group, s, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), value.data_ptr<scalar_t>(),
        sampling_loc.data_ptr<acc_t>(), attn_weight.data_ptr<acc_t>(), output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output_in,
                                                             const at::Tensor& value_in,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_loc_in,
                                                             const at::Tensor& attn_weight_in) {
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}) &&
                  grad_output_in.scalar_type() == value_in.scalar_type(),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) in the dtype of value, got ",
              grad_output_in.sizes(), " ", dtype_name(grad_output_in.scalar_type()));
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto grad_output = grad_output_in.contiguous();
  const auto value = value_in.contiguous();
  const auto sampling_loc = sampling_loc_in.contiguous();
  const auto attn_weight = attn_weight_in.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto acc_type = accumulate_type(value.scalar_type());
  // grad_value is accumulated with atomics (needs zeros), in fp32 for half types; the other two
  // are fully written by the kernel.
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty(sampling_loc.sizes(), sampling_loc.options());
  auto grad_attn = at::empty(attn_weight.sizes(), attn_weight.options());
  const int group = group_size(s.channels);
  const int64_t threads = s.batch * s.queries * s.heads * group;
  if (threads > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t><<<num_blocks(threads), kThreadsPerBlock, 0, stream>>>(
          threads, group, s, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), grad_output.data_ptr<scalar_t>(),
          value.data_ptr<scalar_t>(), sampling_loc.data_ptr<acc_t>(), attn_weight.data_ptr<acc_t>(),
          grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type() ? grad_value_acc
                                                                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda
}  // namespace lt_distill

TORCH_LIBRARY_IMPL(lt_distill, CUDA, m) {
  m.impl("ms_deform_attn", &lt_distill::msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &lt_distill::msda::backward_cuda);
}
