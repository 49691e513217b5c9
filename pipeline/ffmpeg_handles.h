// The FFmpeg objects one decoder owns, freed together by one destructor: as a member, they are
// freed even when the owner's constructor throws half-way (pipeline-internal).
#pragma once

#include <string>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
}

namespace prefixcap {

struct StreamInput;  // audio_decode.h

// Opens a stream (stdin, a URL, a capture device) into *context with the input's format,
// raw-PCM options, I/O timeout and stop flag; throws FileError (audio_decode.cpp).
void open_stream_input(AVFormatContext** context, const StreamInput& input);
// How a stream is named in messages: "stdin" for "-", else its URL.
std::string stream_name(const StreamInput& input);

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
