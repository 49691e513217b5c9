// Any media file to a mono float waveform at the encoder's rate.
// libsndfile reads what it knows (WAV incl. float, FLAC, Ogg Vorbis/Opus, AIFF, MP3); FFmpeg
// reads the rest (AAC/M4A, audio tracks of MP4/MKV/WebM, ...). The format is detected from the
// content, never the file name. Downmix = mean of the channels; resampling = libsoxr's very
// high quality windowed-sinc resampler. Long files stream in chunks with bounded memory.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace prefixcap {

struct AudioInfo {
  int sample_rate = 0;        // native rate of the file
  int channels = 0;           // native channel count
  int64_t frames = -1;        // native frames when the container says so, else -1
  double duration_s = -1;     // frames / sample_rate, or the container's duration, or -1
  std::string decoder;        // "libsndfile" or "ffmpeg"
  std::string format;         // container / codec description
};

struct AudioDecodeOptions {
  int target_rate = 32000;    // output rate in Hz; 0 = keep the native rate
  bool mono = true;           // mean of the channels; false keeps them interleaved (native rate only)
  double start_s = 0;         // skip this much audio first (window captioning)
  double duration_s = -1;     // stop after this much audio (-1 = to the end)
};

class AudioSource;  // one decoder backend

// A live or piped input (caption --stream): read once, front to back, as it arrives.
struct StreamInput {
  std::string url;            // "-" = standard input; a file; any URL FFmpeg opens (http, rtsp,
                              // udp, ...); with a capture device format, the device ("default")
  std::string format;         // FFmpeg input format or device: "s16le" (raw PCM), "mpegts",
                              // "alsa", "pulse", ...; "" = detect from the content
  int sample_rate = 0;        // raw PCM: its rate and channel count (required for raw formats)
  int channels = 0;
  double io_timeout_s = 30;   // a network read that stalls this long fails (0 = wait forever)
  const std::atomic<bool>* stop = nullptr;  // once set, the stream ends at the next read (SIGINT)
};

// Raw PCM formats (s16le, f32le, u8, ...): the ones that need a rate and a channel count.
bool is_raw_pcm_format(const std::string& format);

// Streaming reader: read() returns the next output samples until the file ends.
class AudioReader {
 public:
  // Opens and probes the file; throws FileError naming the file and the reason.
  AudioReader(const std::string& path, const AudioDecodeOptions& options = {});
  // Opens a stream through FFmpeg; a stream has no announced length to check, and ends at its
  // EOF or when input.stop is set. Throws FileError naming the URL and the reason.
  AudioReader(const StreamInput& input, const AudioDecodeOptions& options = {});
  ~AudioReader();
  AudioReader(const AudioReader&) = delete;
  AudioReader& operator=(const AudioReader&) = delete;

  const AudioInfo& info() const { return info_; }
  const std::string& path() const { return path_; }
  int output_rate() const { return output_rate_; }
  int output_channels() const { return output_channels_; }
  // Appends up to max_frames output frames to `out`; returns how many (0 = end of audio).
  // Throws FileError on corrupt or truncated data.
  size_t read(std::vector<float>& out, size_t max_frames);
  // Output frames delivered so far (the offset of the next sample, at output_rate()).
  int64_t position() const { return position_; }

 private:
  void start(std::unique_ptr<AudioSource> source);  // the shared part of the constructors
  bool pull_native();  // decodes one native chunk into the resampler; false at end
  void check_complete() const;

  std::string path_;
  AudioDecodeOptions options_;
  AudioInfo info_;
  int output_rate_ = 0;
  int output_channels_ = 1;
  std::unique_ptr<AudioSource> source_;
  struct Resampler;
  std::unique_ptr<Resampler> resampler_;
  std::vector<float> pending_;   // output samples not yet returned
  size_t pending_begin_ = 0;
  int64_t native_skip_ = 0;      // native frames still to drop (start_s)
  int64_t native_left_ = -1;     // native frames still to deliver (duration_s), -1 = all
  int64_t native_decoded_ = 0;   // native frames decoded so far
  bool source_done_ = false;
  bool flushed_ = false;
  bool live_ = false;            // a stream: no announced length to hold it to
  int64_t position_ = 0;
};

struct Waveform {
  std::vector<float> samples;  // interleaved when channels > 1
  int sample_rate = 0;
  int channels = 1;
  AudioInfo source;
};

// Windows of a long recording for captioning: [start, end) pairs of `window_s` every `hop_s`
// seconds covering [0, duration_s]; the last window is cut at the end. Throws for hop <= 0 or
// window <= 0.
std::vector<std::pair<double, double>> window_spans(double duration_s, double window_s, double hop_s);

// The windows of window_spans(duration, window_s, hop_s) read through `reader` as they
// complete: `emit(start_s, end_s, samples)` is called once per window, in order, with the same
// samples a whole-file decode would cut out; only about window_s + hop_s seconds of audio are
// held at any time, so memory does not grow with the recording's length. Throws FileError for
// a file without audio (and whatever the reader throws).
void stream_windows(AudioReader& reader, double window_s, double hop_s,
                    const std::function<void(double start_s, double end_s, std::vector<float>&& samples)>& emit);

// The whole file (or the requested window) at once.
Waveform decode_audio(const std::string& path, const AudioDecodeOptions& options = {});

}  // namespace prefixcap
