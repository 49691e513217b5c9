// The storage / compute types of frozen inference weights, shared by the LM (`--lm-dtype`) and
// the encoders (`--encoder-dtype`).
#pragma once

#include <string>

namespace prefixcap {

// Float32: as loaded. BFloat16: weights rounded to bfloat16. Int8: weights int8 with one scale
// per output row, activations float32 (weight-only). Int8Dynamic: the same int8 weights, and each
// row of activations quantised to int8 when it is multiplied (W8A8, integer dot products).
enum class WeightDtype { Float32, BFloat16, Int8, Int8Dynamic };

// "float32" | "bfloat16" | "int8" | "int8-dynamic"; anything else throws std::invalid_argument
// naming the choices.
WeightDtype parse_weight_dtype(const std::string& name);
const char* weight_dtype_name(WeightDtype dtype);

}  // namespace prefixcap
