#include "core/weight_dtype.h"

#include <stdexcept>

namespace prefixcap {

WeightDtype parse_weight_dtype(const std::string& name) {
  if (name == "float32") return WeightDtype::Float32;
  if (name == "bfloat16") return WeightDtype::BFloat16;
  if (name == "int8") return WeightDtype::Int8;
  if (name == "int8-dynamic") return WeightDtype::Int8Dynamic;
  throw std::invalid_argument("weight type '" + name + "' is not one of float32, bfloat16, int8, int8-dynamic");
}

const char* weight_dtype_name(WeightDtype dtype) {
  switch (dtype) {
    case WeightDtype::BFloat16: return "bfloat16";
    case WeightDtype::Int8: return "int8";
    case WeightDtype::Int8Dynamic: return "int8-dynamic";
    default: return "float32";
  }
}

}  // namespace prefixcap
