// Live captioning of one stream (caption --stream): rolling windows are captioned as soon as
// they are complete, while the stream goes on being read — audio windows with an audio bundle,
// windows of sampled video frames with an image bundle.
//
// The reader (the calling thread) cuts windows (stream_windows, stream_video_windows) and hands them to one
// captioning thread through a queue of at most `max_pending` windows. When the captioner is
// slower than the stream, the overrun policy decides, so memory never grows:
//   Block: the reader waits (a pipe or file then waits too; no window is lost);
//   Drop:  the oldest waiting window is dropped and counted (live sources keep up with now).
// When several windows are waiting, up to `batch_size` of them are captioned together.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "pipeline/audio_decode.h"
#include "pipeline/captioner.h"
#include "pipeline/video_decode.h"

namespace prefixcap {

enum class OverrunPolicy { Block, Drop };
OverrunPolicy parse_overrun_policy(const std::string& name);  // "block" | "drop"; throws otherwise

struct StreamOptions {
  double window_s = 10;
  double hop_s = 0;        // 0 = window_s
  int max_pending = 4;     // complete windows waiting for the captioner, at most
  int batch_size = 8;      // waiting windows captioned together, at most
  OverrunPolicy overrun = OverrunPolicy::Block;
};

struct StreamWindow {
  double start_s = 0, end_s = 0;   // stream time
  std::vector<Caption> captions;   // best first
  double latency_ms = 0;           // from the window's last sample being read to its caption
  int64_t dropped_so_far = 0;      // windows dropped before this one (Drop policy)
  int batch = 1;                   // windows captioned in the same batch
};

struct StreamSummary {
  int64_t windows = 0;   // captioned
  int64_t dropped = 0;   // dropped by the overrun policy
  double stream_s = 0;   // stream time read
  double wall_s = 0;
};

// One complete window from the reader: audio samples (audio bundles) or frames (image bundles).
struct StreamChunk {
  double start_s = 0, end_s = 0;
  std::vector<float> samples;
  std::vector<VideoFrame> frames;
};
// Reads the stream to its end, handing each complete window to `emit`, in order.
using StreamProducer = std::function<void(const std::function<void(StreamChunk&&)>& emit)>;

// Runs `produce` in the calling thread and captions its windows in a second one, calling
// `on_window` from there for each, in stream order. Windows already read are captioned before
// it returns or rethrows a read error. Throws what the producer or the captioner throws.
StreamSummary caption_stream(Captioner& captioner, const StreamProducer& produce, const DecodingOptions& decoding,
                             const StreamOptions& options, const std::function<void(const StreamWindow&)>& on_window);

// Audio: the windows of `reader` (stream_windows with options.window_s / hop_s).
StreamSummary caption_stream(Captioner& captioner, AudioReader& reader, const DecodingOptions& decoding,
                             const StreamOptions& options, const std::function<void(const StreamWindow&)>& on_window);

}  // namespace prefixcap
