// Frames of a video for the image path: decode with FFmpeg, keep K frames spread evenly over
// the clip (frame i nearest after (i + 0.5) * duration / K), as 8-bit RGB.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "encoders/clip_image_encoder.h"
#include "encoders/image_preprocess.h"

namespace prefixcap {

struct VideoFrame {
  Image8 image;           // RGB
  double time_s = 0;      // presentation time
};

struct VideoInfo {
  double duration_s = -1;
  int width = 0, height = 0;
  bool has_audio = false;
};

struct VideoLimits {
  int64_t max_frame_pixels = 100'000'000;  // refuse larger frames (as the image decoder does)
  int64_t max_decoded_frames = 2'000'000;  // refuse to decode more frames than this (about 18 h at 30 fps)
};

// Throws FileError when the file has no video track, no frame decodes, or a limit is passed.
// Memory is bounded: when the duration is unknown, at most 2 * count frames are held while the
// stream is decoded (every other one dropped as they accumulate), then `count` are picked.
std::vector<VideoFrame> sample_video_frames(const std::string& path, int count, VideoInfo* info = nullptr,
                                            const VideoLimits& limits = {});

struct VideoFeatures {
  at::Tensor frame_embeds;   // [K, projection_dim]: one CLIP image embedding per sampled frame
  at::Tensor frame_tokens;   // [K, 1 + patches, width]: last_hidden_state per frame
  at::Tensor mean_embed;     // [projection_dim]: mean over the frames
};

// Every frame through CLIP preprocessing and the vision transformer, batched.
VideoFeatures encode_video_frames(const std::vector<VideoFrame>& frames, ClipImageEncoderImpl& vit,
                                  const ClipPreprocessConfig& preprocess);

}  // namespace prefixcap
