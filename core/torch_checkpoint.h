// Reader for PyTorch zip-format checkpoints (torch.save since 1.6: pytorch_model.bin, .pt,
// .pth). A small, strict unpickler that understands state dicts and nothing else: it
// refuses every Python global other than OrderedDict, the tensor-rebuild functions and the
// storage classes, so a checkpoint can never make the reader run code.
#pragma once

#include <string>

#include "core/tensor_map.h"

namespace prefixcap {

// Every tensor of the checkpoint, named by its path through nested dicts joined with '.'
// (`{'model': {'conv.weight': t}}` gives "model.conv.weight"). Non-tensor leaves (epoch
// counters, argument strings) are skipped. Throws FileError with the reason, including
// for legacy (non-zip) pickles, with the command that converts them.
TensorMap load_torch_checkpoint(const std::string& path);

}  // namespace prefixcap
