#include "core/weights.h"

#include <fstream>
#include <set>

#include <torch/nn/module.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/torch_checkpoint.h"

namespace prefixcap {

TensorMap load_weight_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open");
  unsigned char head[9] = {0};
  in.read(reinterpret_cast<char*>(head), 9);
  in.close();
  // safetensors: 8-byte header length, then '{'. Zip: "PK\3\4". Legacy torch.save: a pickle
  // (PROTO 2..5) whose first value is the LONG1 magic number.
  const bool is_safetensors = head[8] == '{';
  const bool is_zip = head[0] == 'P' && head[1] == 'K' && head[2] == 3 && head[3] == 4;
  const bool is_pickle = head[0] == 0x80 && head[1] >= 2 && head[1] <= 5 && head[2] == 0x8a;
  if (!is_safetensors && (is_zip || is_pickle)) return load_torch_checkpoint(path);
  return load_safetensors(path);
}

bool glob_match(const std::string& pattern, const std::string& name) {
  // Iterative wildcard match with backtracking to the last '*'.
  size_t p = 0, n = 0, star = std::string::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

namespace {
bool matches_any(const std::vector<std::string>& patterns, const std::string& name) {
  for (const auto& p : patterns)
    if (glob_match(p, name)) return true;
  return false;
}
}  // namespace

void load_state_strict(torch::nn::Module& module, const TensorMap& weights,
                       const StrictLoadOptions& options) {
  const std::string where = options.source.empty() ? "weights" : options.source;
  std::vector<std::string> problems;
  std::set<std::string> used;

  auto module_tensors = module.named_parameters(/*recurse=*/true);
  auto buffers = module.named_buffers(/*recurse=*/true);
  std::vector<std::pair<std::string, at::Tensor>> targets;
  for (const auto& item : module_tensors) targets.emplace_back(item.key(), item.value());
  for (const auto& item : buffers) targets.emplace_back(item.key(), item.value());

  torch::NoGradGuard no_grad;
  for (auto& [name, target] : targets) {
    auto it = weights.find(name);
    if (it == weights.end()) {
      if (!matches_any(options.optional, name)) problems.push_back("tensor '" + name + "' is missing");
      continue;
    }
    used.insert(name);
    const bool transpose = matches_any(options.transposed, name);
    if (transpose && (it->second.dim() != 2 || target.dim() != 2)) {
      problems.push_back("tensor '" + name + "': expected a 2-D tensor, got " + shape_to_string(it->second.sizes().vec()));
      continue;
    }
    const at::Tensor src = transpose ? it->second.t() : it->second;
    if (src.sizes() != target.sizes()) {
      const at::Tensor expected = transpose ? target.t() : target;
      problems.push_back("tensor '" + name + "': expected " + shape_to_string(expected.sizes().vec()) +
                         ", got " + shape_to_string(it->second.sizes().vec()));
      continue;
    }
    if (at::isFloatingType(target.scalar_type()) != at::isFloatingType(src.scalar_type())) {
      problems.push_back("tensor '" + name + "': expected a " +
                         (at::isFloatingType(target.scalar_type()) ? "floating" : "integer") +
                         " tensor, got " + std::string(c10::toString(src.scalar_type())));
      continue;
    }
    if (src.scalar_type() == target.scalar_type() && src.device() == target.device()) {
      // Share the checkpoint's memory (mapped file or checkpoint record): no second copy.
      target.set_data(src.is_contiguous() ? src : src.contiguous());
    } else {
      target.set_data(src.to(target.device(), target.scalar_type()).contiguous());
    }
  }
  std::vector<std::string> unused;
  for (const auto& [name, tensor] : weights)
    if (!used.count(name) && !matches_any(options.ignorable, name)) unused.push_back(name);
  if (!unused.empty()) {
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 8; ++i) list += (i ? ", '" : "'") + unused[i] + "'";
    if (unused.size() > 8) list += ", ... (" + std::to_string(unused.size()) + " in all)";
    problems.push_back("unexpected tensors not used by the model: " + list);
  }
  if (!problems.empty()) {
    std::string message = where + ": " + problems[0];
    for (size_t i = 1; i < problems.size() && i < 20; ++i) message += "\n" + where + ": " + problems[i];
    if (problems.size() > 20) message += "\n... " + std::to_string(problems.size() - 20) + " more";
    throw std::runtime_error(message);
  }
}

TensorMap module_tensors(const torch::nn::Module& module, const std::string& prefix, const std::string& skip_buffers) {
  TensorMap out;
  for (const auto& p : module.named_parameters()) out[prefix + p.key()] = p.value().detach();
  for (const auto& b : module.named_buffers())
    if (skip_buffers.empty() || b.key().rfind(skip_buffers, 0) != 0) out[prefix + b.key()] = b.value().detach();
  return out;
}

TensorMap tensors_under(const TensorMap& tensors, const std::string& prefix) {
  TensorMap out;
  for (auto it = tensors.lower_bound(prefix); it != tensors.end() && it->first.rfind(prefix, 0) == 0; ++it)
    out[it->first.substr(prefix.size())] = it->second;
  return out;
}

}  // namespace prefixcap
