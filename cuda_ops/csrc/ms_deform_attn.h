// Host-side argument checks shared by the CPU and CUDA implementations of lt_distill::ms_deform_attn.
//
// Shapes (Deformable-DETR): value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W);
// level_start_index (L,) int64; sampling_loc (N, Lq, M, L, P, 2) normalised (x, y);
// attn_weight (N, Lq, M, L, P); output (N, Lq, M * D).
// sampling_loc and attn_weight are in the accumulation dtype of value: float32 for
// fp16/bf16/fp32 values, float64 for fp64 values (the Python wrapper casts them).
#pragma once

#include <ATen/ATen.h>

namespace lt_distill {
namespace msda {

struct Sizes {
  int64_t batch;    // N
  int64_t spatial;  // S
  int64_t heads;    // M
  int64_t channels; // D
  int64_t queries;  // Lq
  int64_t levels;   // L
  int64_t points;   // P
};

inline at::ScalarType accumulate_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

inline const char* dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(type);
  }
}

inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                          const at::Tensor& attn_weight) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ", sampling_loc.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                sampling_loc.size(1), sampling_loc.size(3), sampling_loc.size(4)};
  TORCH_CHECK(sampling_loc.size(0) == s.batch && sampling_loc.size(2) == s.heads,
              "ms_deform_attn: sampling_locations ", sampling_loc.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = ", sampling_loc.sizes().slice(0, 5),
              ", got ", attn_weight.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", s.levels, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", s.levels, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || vt == at::kHalf || vt == at::kBFloat16,
              "ms_deform_attn: value must be float16, bfloat16, float32 or float64, got ", dtype_name(vt));
  const auto acc = accumulate_type(vt);
  TORCH_CHECK(sampling_loc.scalar_type() == acc && attn_weight.scalar_type() == acc,
              "ms_deform_attn: sampling_locations and attention_weights must be ", dtype_name(acc), " for ",
              dtype_name(vt), " values, got ", dtype_name(sampling_loc.scalar_type()), " and ",
              dtype_name(attn_weight.scalar_type()));
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_loc.device() == device && attn_weight.device() == device,
              "ms_deform_attn: all tensors must be on ", device);
  return s;
}

}  // namespace msda
}  // namespace lt_distill
