// Frames of a video for the image path: decode with FFmpeg, keep K frames spread evenly over
// the clip (frame i nearest after (i + 0.5) * duration / K), as 8-bit RGB.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "encoders/clip_image_encoder.h"
#include "encoders/image_preprocess.h"
#include "pipeline/audio_decode.h"

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

// Rolling windows of a video stream (caption --stream with an image bundle): windows of
// `window_s` seconds every `hop_s` seconds of stream time from the first frame, each with
// `count` frames picked as sample_video_frames picks them from a clip of that length (frame i:
// the first at or after start + (i + 0.5) * window_s / count). A window is emitted as soon as a
// frame at or past its end is decoded. At the end of the stream (or when input.stop is set), a
// window the stream covers (its last frame lasts to the window's end) is emitted with its last
// frame repeated for targets past it, as a file's are; one the stream ends inside is cut at
// the last frame and sampled evenly from its frames as sample_video_frames samples a video of
// unknown length (at most 2 * count frames kept per window). At most ceil(window / hop) windows
// are open at a time.
void stream_video_windows(const StreamInput& input, double window_s, double hop_s, int count,
                          const std::function<void(double start_s, double end_s, std::vector<VideoFrame>&& frames)>& emit,
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
