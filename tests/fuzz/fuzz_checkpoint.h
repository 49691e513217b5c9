// Shared by the checkpoint fuzz targets: read a checkpoint file and touch every tensor; only
// FileError may escape.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/torch_checkpoint.h"

namespace prefixcap::fuzz {

inline void read_checkpoint(const std::string& path) {
  try {
    TensorMap tensors = load_torch_checkpoint(path);
    for (const auto& [name, t] : tensors)
      if (t.numel() > 0) (void)t.contiguous();
  } catch (const FileError&) {
  }
}

}  // namespace prefixcap::fuzz
