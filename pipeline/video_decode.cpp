#include "pipeline/video_decode.h"

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>
}

#include <atomic>
#include <cmath>
#include <deque>
#include <memory>
#include <optional>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "encoders/feature_cuda.h"
#include "pipeline/ffmpeg_handles.h"

namespace prefixcap {

namespace {
struct FfmpegVideo : FfmpegHandles {
  SwsContext* sws = nullptr;
  ~FfmpegVideo() { sws_freeContext(sws); }
};

// After avformat_open_input: finds the video track and opens its decoder; returns the track.
int open_video_decoder(FfmpegVideo& v, const std::string& path) {
  if (avformat_find_stream_info(v.format, nullptr) < 0) throw FileError(path, "cannot read stream information");
  const AVCodec* codec = nullptr;
  int stream = av_find_best_stream(v.format, AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
  if (stream < 0 || !codec) throw FileError(path, "no decodable video track");
  AVStream* st = v.format->streams[stream];
  v.codec = avcodec_alloc_context3(codec);
  if (!v.codec || avcodec_parameters_to_context(v.codec, st->codecpar) < 0 || avcodec_open2(v.codec, codec, nullptr) < 0)
    throw FileError(path, "cannot open the video decoder");
  v.packet = av_packet_alloc();
  v.frame = av_frame_alloc();
  return stream;
}

void check_frame_size(const std::string& path, int64_t width, int64_t height, const VideoLimits& limits) {
  if (width < 0 || height < 0 || (height > 0 && width > limits.max_frame_pixels / height))
    throw FileError(path, "video frames of " + std::to_string(width) + "x" + std::to_string(height) +
                              " pixels exceed the limit of " + std::to_string(limits.max_frame_pixels));
}

// The decoded frame in v.frame as 8-bit RGB.
VideoFrame frame_to_rgb(FfmpegVideo& v, const std::string& path, double time_s, const VideoLimits& limits) {
  check_frame_size(path, v.frame->width, v.frame->height, limits);
  VideoFrame f;
  f.time_s = time_s;
  f.image.width = v.frame->width;
  f.image.height = v.frame->height;
  f.image.channels = 3;
  f.image.pixels.resize(static_cast<size_t>(f.image.width) * f.image.height * 3);
  v.sws = sws_getCachedContext(v.sws, v.frame->width, v.frame->height, static_cast<AVPixelFormat>(v.frame->format),
                               v.frame->width, v.frame->height, AV_PIX_FMT_RGB24, SWS_BICUBIC | SWS_ACCURATE_RND,
                               nullptr, nullptr, nullptr);
  if (!v.sws) throw FileError(path, "cannot convert the video's pixel format");
  uint8_t* dst[4] = {f.image.pixels.data(), nullptr, nullptr, nullptr};
  int dst_stride[4] = {f.image.width * 3, 0, 0, 0};
  sws_scale(v.sws, v.frame->data, v.frame->linesize, 0, v.frame->height, dst, dst_stride);
  return f;
}

// Decodes the video track, calling on_frame() with each frame in v.frame until it returns false
// or the stream ends (the decoder drained). A failed read ends the stream when read_errors_end
// (files: like FFmpeg's tools, a damaged tail is the end) or when *stop is set; else it throws.
void decode_frames(FfmpegVideo& v, int stream, const std::string& path, bool read_errors_end,
                   const std::atomic<bool>* stop, const std::function<bool()>& on_frame) {
  bool draining = false;
  while (true) {
    int rc = avcodec_receive_frame(v.codec, v.frame);
    if (rc == 0) {
      const bool more = on_frame();
      av_frame_unref(v.frame);
      if (!more) return;
      continue;
    }
    if (rc == AVERROR_EOF || (rc == AVERROR(EAGAIN) && draining)) return;
    if (rc != AVERROR(EAGAIN)) throw FileError(path, "corrupt video data");
    rc = av_read_frame(v.format, v.packet);
    if (rc < 0) {
      if (!read_errors_end && rc != AVERROR_EOF && !(stop && stop->load())) {
        char message[AV_ERROR_MAX_STRING_SIZE] = {0};
        av_strerror(rc, message, sizeof message);
        throw FileError(path, std::string("cannot read the stream (") + message + ")");
      }
      draining = true;
      avcodec_send_packet(v.codec, nullptr);
      continue;
    }
    if (v.packet->stream_index == stream) avcodec_send_packet(v.codec, v.packet);
    av_packet_unref(v.packet);
  }
}

// Frames of a video of unknown length, held in bounded memory: frames 0, stride, 2·stride, ...
// are kept; at 2·count kept, every other one is dropped and the stride doubles. pick() then
// takes `count` spread evenly over what was kept.
class ThinnedFrames {
 public:
  explicit ThinnedFrames(int count) : count_(count) {}
  // Whether the next frame is one to keep (counts it either way).
  bool keeps_next() { return seen_++ % stride_ == 0; }
  void keep(VideoFrame frame) {
    kept_.push_back(std::move(frame));
    if (kept_.size() >= 2 * static_cast<size_t>(count_)) {
      std::vector<VideoFrame> thinned;
      for (size_t i = 0; i < kept_.size(); i += 2) thinned.push_back(std::move(kept_[i]));
      kept_ = std::move(thinned);
      stride_ *= 2;
    }
  }
  bool empty() const { return kept_.empty(); }
  std::vector<VideoFrame> pick() const {
    std::vector<VideoFrame> picked;
    for (int i = 0; i < count_; ++i)
      picked.push_back(kept_[std::min(kept_.size() - 1, static_cast<size_t>((i + 0.5) * kept_.size() / count_))]);
    return picked;
  }

 private:
  int count_;
  std::vector<VideoFrame> kept_;
  int64_t seen_ = 0, stride_ = 1;
};

}  // namespace

std::vector<VideoFrame> sample_video_frames(const std::string& path, int count, VideoInfo* info_out, const VideoLimits& limits) {
  if (count <= 0) throw std::invalid_argument("frame count must be positive");
  av_log_set_level(AV_LOG_QUIET);
  FfmpegVideo v;
  if (avformat_open_input(&v.format, path.c_str(), nullptr, nullptr) < 0)
    throw FileError(path, "not a readable video file");
  const int stream = open_video_decoder(v, path);
  AVStream* st = v.format->streams[stream];

  VideoInfo info;
  info.width = v.codec->width;
  info.height = v.codec->height;
  check_frame_size(path, info.width, info.height, limits);
  info.has_audio = av_find_best_stream(v.format, AVMEDIA_TYPE_AUDIO, -1, -1, nullptr, 0) >= 0;
  const double time_base = av_q2d(st->time_base);
  if (st->duration != AV_NOPTS_VALUE && st->duration > 0) info.duration_s = st->duration * time_base;
  else if (v.format->duration != AV_NOPTS_VALUE && v.format->duration > 0) info.duration_s = double(v.format->duration) / AV_TIME_BASE;
  const double start = st->start_time != AV_NOPTS_VALUE ? st->start_time * time_base : 0.0;

  // Targets; with an unknown duration every frame is kept and thinned at the end.
  std::vector<double> targets;
  if (info.duration_s > 0)
    for (int i = 0; i < count; ++i) targets.push_back(start + (i + 0.5) * info.duration_s / count);
  std::vector<VideoFrame> picked;
  ThinnedFrames all(count);  // unknown duration
  size_t next = 0;

  auto convert = [&](double t) { return frame_to_rgb(v, path, t - start, limits); };
  int64_t decoded = 0;
  auto take = [&]() {
    if (++decoded > limits.max_decoded_frames)
      throw FileError(path, "more than " + std::to_string(limits.max_decoded_frames) + " video frames decoded without reaching the sampled times");
    int64_t pts = v.frame->best_effort_timestamp;
    double t = pts == AV_NOPTS_VALUE ? 0.0 : pts * time_base;
    if (targets.empty()) {
      if (all.keeps_next()) all.keep(convert(t));
      return;
    }
    // This frame serves every target it is the first frame at or after.
    while (next < targets.size() && t + 1e-9 >= targets[next]) {
      picked.push_back(convert(t));
      ++next;
    }
  };

  decode_frames(v, stream, path, /*read_errors_end=*/true, nullptr, [&] {
    take();
    return targets.empty() || next < targets.size();
  });
  if (decoded == 0) throw FileError(path, "no video frame could be decoded");
  if (targets.empty()) {
    picked = all.pick();
  } else {
    // The stream ended before the last targets (duration overstated): repeat the last frame kept,
    // or, if none was kept, fall back to the end of the stream.
    if (picked.empty()) throw FileError(path, "no video frame at or after " + std::to_string(targets[0]) + " s");
    while (picked.size() < targets.size()) picked.push_back(picked.back());
  }
  if (info_out) *info_out = info;
  return picked;
}

void stream_video_windows(const StreamInput& input, double window_s, double hop_s, int count,
                          const std::function<void(double, double, std::vector<VideoFrame>&&)>& emit,
                          const VideoLimits& limits) {
  if (!(window_s > 0) || !(hop_s > 0)) throw std::invalid_argument("window and hop must be positive seconds");
  if (count <= 0) throw std::invalid_argument("frame count must be positive");
  const std::string path = stream_name(input);
  FfmpegVideo v;
  open_stream_input(&v.format, input);
  const int stream = open_video_decoder(v, path);
  AVStream* st = v.format->streams[stream];
  check_frame_size(path, v.codec->width, v.codec->height, limits);
  const double time_base = av_q2d(st->time_base);
  const double frame_s = st->avg_frame_rate.num > 0 ? 1.0 / av_q2d(st->avg_frame_rate) : 0.0;

  struct Open {
    double start = 0;
    std::vector<double> targets;  // stream-relative times
    std::vector<VideoFrame> picked;
    // For a window the stream ends inside: its frames, thinned as sample_video_frames thins a
    // video of unknown length.
    ThinnedFrames kept;
  };
  std::deque<Open> open;
  double origin = st->start_time != AV_NOPTS_VALUE ? st->start_time * time_base : NAN;  // stream time 0
  double next_start = 0, last_t = -1;
  auto take = [&](double t) {  // t: stream-relative time of the frame in v.frame
    while (next_start <= t + 1e-9) {
      Open w{next_start, {}, {}, ThinnedFrames(count)};
      for (int i = 0; i < count; ++i) w.targets.push_back(next_start + (i + 0.5) * window_s / count);
      open.push_back(std::move(w));
      next_start += hop_s;
    }
    std::optional<VideoFrame> rgb;  // converted once, for every target this frame serves
    for (auto& w : open) {
      while (w.picked.size() < w.targets.size() && t + 1e-9 >= w.targets[w.picked.size()]) {
        if (!rgb) rgb = frame_to_rgb(v, path, t, limits);
        w.picked.push_back(*rgb);
      }
      if (t < w.start + window_s && w.kept.keeps_next()) {
        if (!rgb) rgb = frame_to_rgb(v, path, t, limits);
        w.kept.keep(*rgb);
      }
    }
    while (!open.empty() && t + 1e-9 >= open.front().start + window_s) {
      emit(open.front().start, open.front().start + window_s, std::move(open.front().picked));
      open.pop_front();
    }
    last_t = t;
  };

  int64_t decoded = 0;
  decode_frames(v, stream, path, /*read_errors_end=*/false, input.stop, [&] {
    ++decoded;
    const int64_t pts = v.frame->best_effort_timestamp;
    double t = pts == AV_NOPTS_VALUE ? (last_t < 0 ? 0.0 : last_t + frame_s) : pts * time_base;
    if (std::isnan(origin)) origin = t;
    if (pts != AV_NOPTS_VALUE) t -= origin;
    take(std::max(t, last_t));  // never back in time (B-frame reordering is already undone)
    return true;
  });
  if (decoded == 0) throw FileError(path, "no video frame could be decoded");
  // The end: a window whose every target was reached is complete; one the stream ends inside is
  // cut at the last frame and sampled evenly from the frames it kept.
  const double stream_end = last_t + frame_s;
  for (auto& w : open) {
    if (!w.picked.empty() && stream_end + 1e-6 >= w.start + window_s) {
      // The stream covers the window (its last frame lasts to the window's end): targets after the
      // last frame take that frame, as sample_video_frames does at the end of a file.
      while (w.picked.size() < w.targets.size()) w.picked.push_back(w.picked.back());
      emit(w.start, w.start + window_s, std::move(w.picked));
      continue;
    }
    if (w.kept.empty()) continue;
    emit(w.start, std::min(w.start + window_s, last_t + frame_s), w.kept.pick());
  }
}

VideoFeatures encode_video_frames(const std::vector<VideoFrame>& frames, ClipImageEncoderImpl& vit,
                                  const ClipPreprocessConfig& preprocess) {
  if (frames.empty()) throw std::invalid_argument("encode_video_frames: no frames");
  std::vector<const Image8*> images;
  for (const auto& f : frames) images.push_back(&f.image);
  ClipVisionOutput out = vit.forward(clip_pixel_batch(images, preprocess, vit.parameters()[0].device()));
  VideoFeatures v;
  v.frame_embeds = out.image_embeds;
  v.frame_tokens = out.last_hidden_state;
  v.mean_embed = out.image_embeds.mean(0);
  return v;
}

}  // namespace prefixcap
