// Weight files in any supported format, and strict loading into LibTorch modules.
#pragma once

#include <string>
#include <vector>

#include "core/tensor_map.h"

namespace torch {
namespace nn {
class Module;
}
}  // namespace torch

namespace prefixcap {

// Reads a safetensors file or a PyTorch zip checkpoint, chosen by the file's content (not its
// name). Throws FileError naming the file and the problem.
TensorMap load_weight_file(const std::string& path);

// True if `name` matches `pattern`, where '*' matches any run of characters.
bool glob_match(const std::string& pattern, const std::string& name);

struct StrictLoadOptions {
  // Checkpoint tensors that may be present and are not used (glob patterns, e.g. "h.*.attn.bias").
  std::vector<std::string> ignorable;
  // Module tensors that may be absent from the checkpoint and keep their initial values.
  std::vector<std::string> optional;
  // Where the weights came from, for messages (a file path).
  std::string source;
  // 2-D checkpoint tensors stored transposed relative to the module (glob patterns, e.g.
  // GPT-2's Conv1D weights [in, out] for a module holding [out, in]); shapes in messages are
  // given in the checkpoint's layout.
  std::vector<std::string> transposed;
};

// Copies `weights` into the parameters and buffers of `module`, whose names must equal the
// keys (map checkpoint names with the model's own table first). Strict: every module tensor
// present, every checkpoint tensor used or declared ignorable, shapes equal, floating tensors
// converted to the module's dtype (F16/BF16 checkpoints load into float32 modules). When the
// dtype already matches, the module shares the checkpoint's memory instead of copying it.
// Throws std::runtime_error listing every problem, e.g.
//   "model.safetensors: tensor 'h.3.attn.c_attn.weight': expected [768, 2304], got [768, 768]".
void load_state_strict(torch::nn::Module& module, const TensorMap& weights,
                       const StrictLoadOptions& options);

// The other direction: every parameter and buffer of `module` (detached, sharing memory) under
// `prefix` + its name; buffers whose names start with `skip_buffers` (when not empty) are left
// out (e.g. CNN14's "front_end." tables, which come from its config).
TensorMap module_tensors(const torch::nn::Module& module, const std::string& prefix = "",
                         const std::string& skip_buffers = "");

// The tensors whose names start with `prefix`, with the prefix taken off.
TensorMap tensors_under(const TensorMap& tensors, const std::string& prefix);

}  // namespace prefixcap
