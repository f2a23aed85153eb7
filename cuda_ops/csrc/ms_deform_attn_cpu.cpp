// lt_distill::ms_deform_attn: operator schema and the CPU kernels.
//
// Forward: at::parallel_for (OpenMP) over (batch, query) pairs; each writes its own output rows.
// Backward: at::parallel_for over (batch, head, level) triples. A triple owns a disjoint block of
// grad_value (levels occupy disjoint ranges of S, heads disjoint channel slices), so gradients are
// accumulated with plain adds, without atomics and deterministically; grad_sampling_loc and
// grad_attn_weight of a point belong to exactly one triple and are written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_core.h"

namespace lt_distill {
namespace msda {
namespace {

// Reads the level table and checks that every level lies inside S and that no two overlap (the
// backward relies on the latter to write grad_value without atomics).
std::vector<std::pair<int64_t, int64_t>> level_table(const at::Tensor& spatial_shapes,
                                                      const at::Tensor& level_start_index, int64_t spatial) {
  const int64_t levels = spatial_shapes.size(0);
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* shape_ptr = shapes.data_ptr<int64_t>();
  const int64_t* start_ptr = starts.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> ranges;  // (start, end) of each level in S
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t h = shape_ptr[2 * l];
    const int64_t w = shape_ptr[2 * l + 1];
    TORCH_CHECK(h > 0 && w > 0 && h * w < (int64_t{1} << 31), "ms_deform_attn: level ", l, " has invalid shape (",
                h, ", ", w, ")");
    TORCH_CHECK(start_ptr[l] >= 0 && start_ptr[l] + h * w <= spatial, "ms_deform_attn: level ", l, " (start ",
                start_ptr[l], ", ", h, "x", w, ") does not fit in S = ", spatial);
    ranges.emplace_back(start_ptr[l], start_ptr[l] + h * w);
  }
  auto sorted = ranges;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i) {
    TORCH_CHECK(sorted[i].first >= sorted[i - 1].second, "ms_deform_attn: levels overlap in S (check level_start_index)");
  }
  return ranges;
}

// Calls fn(std::integral_constant<int, D>) for the common head dims D, so that the channel loops
// have a compile-time trip count (unrolled, accumulators in registers), else
// fn(std::integral_constant<int, 0>) and the trip count is read at run time.
template <typename Fn>
void dispatch_channels(int64_t channels, Fn&& fn) {
  switch (channels) {
    case 8:
      return fn(std::integral_constant<int, 8>{});
    case 16:
      return fn(std::integral_constant<int, 16>{});
    case 32:
      return fn(std::integral_constant<int, 32>{});
    case 64:
      return fn(std::integral_constant<int, 64>{});
    default:
      return fn(std::integral_constant<int, 0>{});
  }
}

template <typename scalar_t, int kChannels>
void forward_kernel(const Sizes& s, const int64_t* shapes, const int64_t* starts, const scalar_t* value,
                    const at::opmath_type<scalar_t>* loc, const at::opmath_type<scalar_t>* attn, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = s.heads * s.channels;
  const int64_t work_per_query = std::max<int64_t>(1, s.heads * s.levels * s.points * s.channels);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_query);
  const int32_t channels = kChannels > 0 ? kChannels : static_cast<int32_t>(s.channels);
  at::parallel_for(0, s.batch * s.queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);
    BilinearTap<acc_t> tap;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / s.queries;
      for (int64_t m = 0; m < s.heads; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t point0 = (nq * s.heads + m) * s.levels * s.points;
        for (int64_t l = 0; l < s.levels; ++l) {
          const auto height = static_cast<int32_t>(shapes[2 * l]);
          const auto width = static_cast<int32_t>(shapes[2 * l + 1]);
          const scalar_t* level = value + ((n * s.spatial + starts[l]) * s.heads + m) * s.channels;
          for (int64_t p = 0; p < s.points; ++p) {
            const int64_t idx = point0 + l * s.points + p;
            if (bilinear_setup(loc[2 * idx], loc[2 * idx + 1], height, width, tap)) {
              bilinear_gather(level, pixel_stride, tap, attn[idx], 0, channels, 1, acc.data());
            }
          }
        }
        scalar_t* out_row = out + (nq * s.heads + m) * s.channels;
        for (int64_t c = 0; c < s.channels; ++c) {
          out_row[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
}

template <typename scalar_t, int kChannels>
void backward_kernel(const Sizes& s, const int64_t* shapes, const int64_t* starts, const scalar_t* grad_out,
                     const scalar_t* value, const at::opmath_type<scalar_t>* loc,
                     const at::opmath_type<scalar_t>* attn, at::opmath_type<scalar_t>* grad_value,
                     at::opmath_type<scalar_t>* grad_loc, at::opmath_type<scalar_t>* grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = s.heads * s.channels;
  const int32_t channels = kChannels > 0 ? kChannels : static_cast<int32_t>(s.channels);
  const auto add = [](acc_t* address, acc_t amount) { *address += amount; };
  at::parallel_for(0, s.batch * s.heads * s.levels, 1, [&](int64_t begin, int64_t end) {
    BilinearTap<acc_t> tap;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % s.levels;
      const int64_t m = (task / s.levels) % s.heads;
      const int64_t n = task / (s.levels * s.heads);
      const auto height = static_cast<int32_t>(shapes[2 * l]);
      const auto width = static_cast<int32_t>(shapes[2 * l + 1]);
      const int64_t level_offset = ((n * s.spatial + starts[l]) * s.heads + m) * s.channels;
      const scalar_t* level = value + level_offset;
      acc_t* grad_level = grad_value + level_offset;
      for (int64_t q = 0; q < s.queries; ++q) {
        const int64_t row = ((n * s.queries + q) * s.heads + m);
        const scalar_t* grad_out_row = grad_out + row * s.channels;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t idx = (row * s.levels + l) * s.points + p;
          PointGrad<acc_t> g{0, 0, 0};
          if (bilinear_setup(loc[2 * idx], loc[2 * idx + 1], height, width, tap)) {
            g = bilinear_backward(level, grad_level, pixel_stride, tap, height, width, attn[idx], grad_out_row, 0,
                                  channels, 1, add);
          }
          grad_attn[idx] = g.attention;
          grad_loc[2 * idx] = g.x;
          grad_loc[2 * idx + 1] = g.y;
        }
      }
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc_in,
                       const at::Tensor& attn_weight_in) {
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in);
  level_table(spatial_shapes, level_start_index, s.spatial);
  const auto value = value_in.contiguous();
  const auto sampling_loc = sampling_loc_in.contiguous();
  const auto attn_weight = attn_weight_in.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  // Every element is written by the kernel: no memset.
  auto output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_channels(s.channels, [&](auto channels) {
      forward_kernel<scalar_t, decltype(channels)::value>(
          s, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), value.data_ptr<scalar_t>(),
          sampling_loc.data_ptr<acc_t>(), attn_weight.data_ptr<acc_t>(), output.data_ptr<scalar_t>());
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output_in,
                                                            const at::Tensor& value_in,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_loc_in,
                                                            const at::Tensor& attn_weight_in) {
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in);
  level_table(spatial_shapes, level_start_index, s.spatial);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}) &&
                  grad_output_in.scalar_type() == value_in.scalar_type(),
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) in the dtype of value, got ",
              grad_output_in.sizes(), " ", dtype_name(grad_output_in.scalar_type()));
  const auto grad_output = grad_output_in.contiguous();
  const auto value = value_in.contiguous();
  const auto sampling_loc = sampling_loc_in.contiguous();
  const auto attn_weight = attn_weight_in.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto acc_type = accumulate_type(value.scalar_type());
  // grad_value is accumulated (needs zeros), in fp32 for half types; the other two are fully written.
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty(sampling_loc.sizes(), sampling_loc.options());
  auto grad_attn = at::empty(attn_weight.sizes(), attn_weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_channels(s.channels, [&](auto channels) {
      backward_kernel<scalar_t, decltype(channels)::value>(
          s, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), grad_output.data_ptr<scalar_t>(),
          value.data_ptr<scalar_t>(), sampling_loc.data_ptr<acc_t>(), attn_weight.data_ptr<acc_t>(),
          grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>());
    });
  });
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type() ? grad_value_acc
                                                                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda
}  // namespace lt_distill

TORCH_LIBRARY(lt_distill, m) {
  // The fake (meta) kernels and the autograd formula are registered from this Python module.
  m.set_python_module("lt_distill.cuda_ops.functions");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lt_distill, CPU, m) {
  m.impl("ms_deform_attn", &lt_distill::msda::forward_cpu);
  m.impl("ms_deform_attn_backward", &lt_distill::msda::backward_cpu);
}
