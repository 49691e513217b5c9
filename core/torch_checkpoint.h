// Reader for PyTorch checkpoints as torch.save and torch.jit.save write them: zip archives
// (torch >= 1.6: pytorch_model.bin, .pt, .pth), legacy (non-zip) files (torch < 1.6 or
// _use_new_zipfile_serialization=False, like the PANNs releases) and TorchScript archives
// (OpenAI's CLIP .pt files). A small, strict unpickler that understands state dicts and nothing
// else: it refuses every Python global other than OrderedDict, the tensor-rebuild functions and
// the storage classes (and, in TorchScript archives, reads `__torch__.*` module objects only as
// dicts of their attributes), so a checkpoint can never make the reader run code.
#pragma once

#include <string>

#include "core/tensor_map.h"

namespace prefixcap {

// Every tensor of the checkpoint, named by its path through nested dicts joined with '.'
// (`{'model': {'conv.weight': t}}` gives "model.conv.weight"). Non-tensor leaves (epoch
// counters, argument strings) are skipped. Throws FileError naming the file and the reason.
TensorMap load_torch_checkpoint(const std::string& path);

}  // namespace prefixcap
