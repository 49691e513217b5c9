// caption-import: turns the anchors' published checkpoints into prefixcap captioner bundles.
//   caption-import clipcap coco_weights.pt -o bundles/clipcap-coco --tokenizer gpt2/ [--clip clip-vit-base-patch32/]
//   caption-import prefix-aac audiocaps.pt -o bundles/prefix-aac --tokenizer gpt2/ --preset audiocaps
#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>

#include "core/threads.h"
#include "pipeline/checkpoint_import.h"

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  using namespace prefixcap;
  CLI::App app{"Turn a ClipCap or Prefix-AAC checkpoint into a prefixcap captioner bundle"};
  app.require_subcommand(1);
  ImportOptions options;
  std::string checkpoint, out_dir, normalize = "auto";
  bool force = false;
  auto common = [&](CLI::App* sub) {
    sub->add_option("checkpoint", checkpoint, "the checkpoint (torch.save zip or safetensors)")->required()->check(CLI::ExistingFile);
    sub->add_option("-o,--output", out_dir, "bundle folder to write")->required();
    sub->add_option("--tokenizer", options.tokenizer_dir, "folder with the GPT-2 vocab.json and merges.txt")
        ->required()
        ->check(CLI::ExistingDirectory);
    sub->add_option("--gpt2-config", options.gpt2_config, "config.json of the GPT-2 inside (default: from the tensors)")
        ->check(CLI::ExistingFile);
    sub->add_flag("--force", force, "replace an existing bundle folder");
  };
  CLI::App* clipcap = app.add_subcommand("clipcap", "ClipCap ClipCaptionModel (MLP) or ClipCaptionPrefix (transformer) weights");
  common(clipcap);
  clipcap->add_option("--clip", options.clip_dir, "CLIP to caption images: a folder (config.json + weights) or an OpenAI file (RN50x4.pt, ViT-B-32.pt)")
      ->check(CLI::ExistingPath);
  clipcap->add_option("--num-heads", options.num_heads, "transformer mapper heads (not stored in the checkpoint)")
      ->capture_default_str();
  clipcap->add_option("--normalize-prefix", normalize, "divide CLIP embeddings by their L2 norm: yes, no, auto (MLP no, transformer yes)")
      ->check(CLI::IsMember({"yes", "no", "auto"}))
      ->capture_default_str();
  CLI::App* aac = app.add_subcommand("prefix-aac", "Prefix-AAC AAC_Prefix state dict");
  common(aac);
  auto* preset = aac->add_option("--preset", options.preset,
                                  "the published configuration: audiocaps (10 s clips, ReLU after the mapping networks' "
                                  "BatchNorm) or clotho (30 s, no ReLU); shapes come from the weights")
                      ->check(CLI::IsMember({"audiocaps", "clotho"}));
  auto* config = aac->add_option("--config", options.model_config, "instead of --preset: a config.json with audio_encoder, gpt2 and "
                                                                   "prefix sizes (see README)")
                     ->check(CLI::ExistingFile);
  preset->excludes(config);
  config->excludes(preset);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;  // --help: 0; any usage error: 1
  }
  options.normalize_prefix = normalize == "auto" ? -1 : normalize == "yes";

  try {
    configure_threads();
    namespace fs = std::filesystem;
    if (fs::exists(out_dir) && !fs::is_empty(out_dir) && !force) {
      std::fprintf(stderr, "caption-import: %s exists and is not empty; pass --force to replace it\n", out_dir.c_str());
      return 1;
    }
    if (aac->parsed() && options.preset.empty() && options.model_config.empty()) {
      std::fprintf(stderr, "caption-import: prefix-aac needs --preset audiocaps|clotho or --config FILE\n");
      return 1;
    }
    Captioner captioner = clipcap->parsed() ? import_clipcap(checkpoint, options) : import_prefix_aac(checkpoint, options);
    // Write into a sibling temporary folder, then swap it in: a failure leaves the old bundle.
    const std::string tmp = out_dir + ".tmp-import";
    fs::remove_all(tmp);
    captioner.save(tmp);
    Captioner::load(tmp);  // what we wrote must load
    if (fs::exists(out_dir)) fs::remove_all(out_dir);
    fs::rename(tmp, out_dir);
    std::printf("wrote %s (%s mapper, prefix %lld x %lld, encoder %s)\n", out_dir.c_str(),
                captioner.mapper->config().type.c_str(), static_cast<long long>(captioner.mapper->config().prefix_length),
                static_cast<long long>(captioner.mapper->config().embed_dim), captioner.encoder_kind().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caption-import: %s\n", e.what());
    return 1;
  }
}
