// The FFmpeg objects one decoder owns, freed together by one destructor: as a member, they are
// freed even when the owner's constructor throws half-way (pipeline-internal).
#pragma once

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
}

namespace prefixcap {

struct FfmpegHandles {
  AVFormatContext* format = nullptr;
  AVCodecContext* codec = nullptr;
  AVPacket* packet = nullptr;
  AVFrame* frame = nullptr;

  FfmpegHandles() = default;
  FfmpegHandles(const FfmpegHandles&) = delete;
  FfmpegHandles& operator=(const FfmpegHandles&) = delete;
  ~FfmpegHandles() {
    av_frame_free(&frame);
    av_packet_free(&packet);
    avcodec_free_context(&codec);
    avformat_close_input(&format);
  }
};

}  // namespace prefixcap
