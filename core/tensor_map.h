// Name -> tensor, ordered by name: what every weight-file reader yields.
#pragma once

#include <map>
#include <string>

#include <ATen/Tensor.h>

namespace prefixcap {

using TensorMap = std::map<std::string, at::Tensor>;

}  // namespace prefixcap
