#include "pipeline/audio_decode.h"

#include <sndfile.h>
#include <soxr.h>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavdevice/avdevice.h>
#include <libavformat/avformat.h>
#include <libavutil/avutil.h>
#include <libavutil/opt.h>
}

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <regex>

#include "core/errors.h"
#include "pipeline/ffmpeg_handles.h"

namespace prefixcap {

class AudioSource {
 public:
  virtual ~AudioSource() = default;
  const AudioInfo& info() const { return info_; }
  // Appends native interleaved float frames; false at the end of the stream.
  virtual bool read(std::vector<float>& out) = 0;

 protected:
  AudioInfo info_;
};

namespace {

uint32_t le32(const unsigned char* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t(p[3]) << 24); }

// libsndfile trusts RIFF sizes loosely: a cut-off WAV decodes as shorter audio without an
// error. Walk the chunks ourselves so truncation and lying sizes are reported, not returned.
void validate_riff(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return;
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  unsigned char head[12];
  if (file_size < 12 || !in.read(reinterpret_cast<char*>(head), 12)) return;
  if (std::memcmp(head, "RIFF", 4) != 0 || std::memcmp(head + 8, "WAVE", 4) != 0) return;
  uint64_t offset = 12;
  while (offset + 8 <= file_size) {
    unsigned char chunk[8];
    in.seekg(static_cast<std::streamoff>(offset));
    if (!in.read(reinterpret_cast<char*>(chunk), 8)) break;
    const uint32_t size = le32(chunk + 4);
    const std::string id(reinterpret_cast<char*>(chunk), 4);
    const uint64_t body = offset + 8;
    if (id == "data") {
      const uint64_t available = file_size - body;
      if (size != 0xFFFFFFFFu && size != 0 && size > available)
        throw FileError(path, "truncated WAV: the header announces " + std::to_string(size) +
                                  " bytes of audio, the file holds " + std::to_string(available));
      return;
    }
    if (body + size > file_size)
      throw FileError(path, "corrupt WAV: chunk '" + id + "' claims " + std::to_string(size) +
                                " bytes, past the end of the file (no audio data found)");
    offset = body + size + (size & 1);
  }
  throw FileError(path, "corrupt WAV: no 'data' chunk");
}

class SndfileSource : public AudioSource {
 public:
  // Returns nullptr (no error) when libsndfile does not recognise the content.
  static std::unique_ptr<SndfileSource> open(const std::string& path) {
    SF_INFO sfinfo;
    std::memset(&sfinfo, 0, sizeof sfinfo);
    SNDFILE* file = sf_open(path.c_str(), SFM_READ, &sfinfo);
    if (!file) return nullptr;
    auto src = std::unique_ptr<SndfileSource>(new SndfileSource(path, file, sfinfo));
    return src;
  }
  ~SndfileSource() override { sf_close(file_); }

  bool read(std::vector<float>& out) override {
    const sf_count_t chunk = 16384;
    const size_t old = out.size();
    out.resize(old + chunk * info_.channels);
    sf_count_t got = sf_readf_float(file_, out.data() + old, chunk);
    if (got < 0) got = 0;
    out.resize(old + got * info_.channels);
    if (sf_error(file_) != SF_ERR_NO_ERROR)
      throw FileError(path_, std::string("decoding failed: ") + sf_strerror(file_));
    read_ += got;
    if (got == 0) {
      if (exact_length_ && unknown_length_)  // libsndfile could not find the stream's end
        throw FileError(path_, "truncated or damaged: the audio stopped after " + std::to_string(read_) +
                                   " frames and the stream's end could not be found");
      if (exact_length_ && info_.frames > 0 && read_ < info_.frames)
        throw FileError(path_, "truncated: " + std::to_string(read_) + " of " + std::to_string(info_.frames) +
                                   " frames could be read");
      return false;
    }
    return true;
  }

 private:
  SndfileSource(const std::string& path, SNDFILE* file, const SF_INFO& sfinfo) : path_(path), file_(file) {
    info_.sample_rate = sfinfo.samplerate;
    info_.channels = sfinfo.channels;
    // SF_COUNT_MAX: libsndfile did not find the length (an Ogg stream whose last page is missing)
    unknown_length_ = sfinfo.frames >= std::numeric_limits<sf_count_t>::max() / 2;
    info_.frames = unknown_length_ ? -1 : sfinfo.frames;
    info_.decoder = "libsndfile";
    SF_FORMAT_INFO fmt;
    fmt.format = sfinfo.format & SF_FORMAT_TYPEMASK;
    info_.format = sf_command(file, SFC_GET_FORMAT_MAJOR, &fmt, sizeof fmt) == 0 && fmt.name ? fmt.name : "?";
    // MPEG frame counts are estimates; every other format libsndfile reads states exact lengths.
    exact_length_ = (sfinfo.format & SF_FORMAT_TYPEMASK) != 0x230000 /* SF_FORMAT_MPEG */;
    if (info_.sample_rate > 0 && info_.frames >= 0) info_.duration_s = double(info_.frames) / info_.sample_rate;
  }
  std::string path_;
  SNDFILE* file_;
  sf_count_t read_ = 0;
  bool exact_length_ = true;
  bool unknown_length_ = false;
};

std::string av_error(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buf, sizeof buf);
  return buf;
}

// FFmpeg asks this between blocking reads; a set flag ends the stream (AVERROR_EXIT).
int stop_requested(void* flag) { return static_cast<const std::atomic<bool>*>(flag)->load() ? 1 : 0; }

}  // namespace

std::string stream_name(const StreamInput& in) { return in.url == "-" ? "stdin" : in.url; }

void open_stream_input(AVFormatContext** context, const StreamInput& in) {
  const std::string name = stream_name(in);
  if (in.url.empty()) throw FileError("(stream)", "no input named");
  av_log_set_level(AV_LOG_QUIET);
  static std::once_flag registered;
  std::call_once(registered, [] {
    avdevice_register_all();
    avformat_network_init();
  });
  const AVInputFormat* format = nullptr;
  if (!in.format.empty()) {
    format = av_find_input_format(in.format.c_str());
    if (!format) throw FileError(name, "FFmpeg has no input format or capture device named '" + in.format + "'");
  }
  const bool raw = is_raw_pcm_format(in.format);
  if (raw && (in.sample_rate <= 0 || in.channels <= 0))
    throw FileError(name, "raw PCM (" + in.format + ") needs its sample rate and channel count");
  if (!raw && (in.sample_rate > 0 || in.channels > 0))
    throw FileError(name, "a sample rate and channel count are only for raw PCM formats (s16le, f32le, ...)");
  AVDictionary* options = nullptr;
  if (in.sample_rate > 0) av_dict_set_int(&options, "sample_rate", in.sample_rate, 0);
  if (in.channels > 0) av_dict_set(&options, "ch_layout", (std::to_string(in.channels) + "C").c_str(), 0);
  if (in.io_timeout_s > 0) av_dict_set_int(&options, "rw_timeout", static_cast<int64_t>(in.io_timeout_s * 1e6), 0);
  *context = avformat_alloc_context();
  if (!*context) throw std::bad_alloc();
  if (in.stop) (*context)->interrupt_callback = {stop_requested, const_cast<std::atomic<bool>*>(in.stop)};
  const std::string url = in.url == "-" ? "pipe:0" : in.url;
  const int rc = avformat_open_input(context, url.c_str(), format, &options);  // frees *context on failure
  av_dict_free(&options);
  if (rc < 0) throw FileError(name, "cannot open the stream (" + av_error(rc) + ")");
}

namespace {

class FfmpegSource : public AudioSource {
 public:
  explicit FfmpegSource(const std::string& path) : path_(path) {
    av_log_set_level(AV_LOG_QUIET);
    int rc = avformat_open_input(&h_.format, path.c_str(), nullptr, nullptr);
    if (rc < 0) throw FileError(path, "not a readable audio or video file (" + av_error(rc) + ")");
    open_decoder();
  }

  // A stream: standard input ("-"), a URL, or a capture device of libavdevice.
  explicit FfmpegSource(const StreamInput& in) : path_(stream_name(in)), stop_(in.stop) {
    open_stream_input(&h_.format, in);
    open_decoder();
  }

  bool read(std::vector<float>& out) override {
    try {
      return read_frame(out);
    } catch (const FileError&) {
      if (stop_ && stop_->load()) return false;  // interrupted: the stream ends here
      throw;
    }
  }

 private:
  void open_decoder() {
    const std::string& path = path_;
    int rc = avformat_find_stream_info(h_.format, nullptr);
    if (rc < 0) throw FileError(path, "cannot read stream information (" + av_error(rc) + ")");
    const AVCodec* codec = nullptr;
    stream_ = av_find_best_stream(h_.format, AVMEDIA_TYPE_AUDIO, -1, -1, &codec, 0);
    if (stream_ < 0 || !codec) throw FileError(path, "no decodable audio track");
    AVStream* st = h_.format->streams[stream_];
    h_.codec = avcodec_alloc_context3(codec);
    if (!h_.codec || avcodec_parameters_to_context(h_.codec, st->codecpar) < 0)
      throw FileError(path, "cannot set up the audio decoder");
    rc = avcodec_open2(h_.codec, codec, nullptr);
    if (rc < 0) throw FileError(path, "cannot open the audio decoder (" + av_error(rc) + ")");
    h_.packet = av_packet_alloc();
    h_.frame = av_frame_alloc();
    info_.sample_rate = h_.codec->sample_rate;
    info_.channels = h_.codec->ch_layout.nb_channels;
    if (info_.sample_rate <= 0 || info_.channels <= 0) throw FileError(path, "audio track without rate or channels");
    info_.decoder = "ffmpeg";
    info_.format = std::string(h_.format->iformat->name) + "/" + codec->name;
    if (st->duration != AV_NOPTS_VALUE && st->duration > 0)
      info_.duration_s = st->duration * av_q2d(st->time_base);
    else if (h_.format->duration != AV_NOPTS_VALUE && h_.format->duration > 0)
      info_.duration_s = double(h_.format->duration) / AV_TIME_BASE;
  }

  bool read_frame(std::vector<float>& out) {
    while (true) {
      int rc = avcodec_receive_frame(h_.codec, h_.frame);
      if (rc == 0) {
        append(out);
        av_frame_unref(h_.frame);
        return true;
      }
      if (rc == AVERROR_EOF) return finish();
      if (rc == AVERROR_INVALIDDATA) {
        skip_bad_packet(rc);
        continue;
      }
      if (rc != AVERROR(EAGAIN)) throw FileError(path_, "corrupt audio data (" + av_error(rc) + ")");
      if (draining_) return finish();
      rc = av_read_frame(h_.format, h_.packet);
      if (rc == AVERROR_EOF) {
        draining_ = true;
        avcodec_send_packet(h_.codec, nullptr);
        continue;
      }
      if (rc < 0) throw FileError(path_, "cannot read the file (" + av_error(rc) + "; truncated?)");
      if (h_.packet->stream_index == stream_) {
        ++packets_;
        rc = avcodec_send_packet(h_.codec, h_.packet);
        if (rc == AVERROR_INVALIDDATA) {
          av_packet_unref(h_.packet);
          skip_bad_packet(rc);
          continue;
        }
        if (rc < 0 && rc != AVERROR(EAGAIN)) {
          av_packet_unref(h_.packet);
          throw FileError(path_, "corrupt audio data (" + av_error(rc) + ")");
        }
      }
      av_packet_unref(h_.packet);
    }
  }

  // Like FFmpeg's own tools, a packet the decoder rejects is skipped (broadcast captures and
  // old AVI files often have a damaged one); a stream that is mostly damaged is an error.
  void skip_bad_packet(int rc) {
    ++bad_packets_;
    if (bad_packets_ > 16 && bad_packets_ * 4 > packets_)
      throw FileError(path_, "corrupt audio data (" + av_error(rc) + "; " + std::to_string(bad_packets_) + " of " +
                                 std::to_string(packets_) + " packets rejected)");
  }
  bool finish() {
    if (bad_packets_ > 0 && frames_ == 0)
      throw FileError(path_, "corrupt audio data (no packet could be decoded)");
    return false;
  }
  void append(std::vector<float>& out) {
    ++frames_;
    const int channels = h_.frame->ch_layout.nb_channels;
    const int n = h_.frame->nb_samples;
    if (channels != info_.channels) throw FileError(path_, "channel count changes inside the stream");
    const size_t old = out.size();
    out.resize(old + size_t(n) * channels);
    float* dst = out.data() + old;
    const auto fmt = static_cast<AVSampleFormat>(h_.frame->format);
    const bool planar = av_sample_fmt_is_planar(fmt);
    for (int c = 0; c < channels; ++c) {
      const uint8_t* plane = planar ? h_.frame->extended_data[c] : h_.frame->extended_data[0];
      for (int i = 0; i < n; ++i) {
        const int idx = planar ? i : i * channels + c;
        float v;
        switch (av_get_packed_sample_fmt(fmt)) {
          case AV_SAMPLE_FMT_FLT: v = reinterpret_cast<const float*>(plane)[idx]; break;
          case AV_SAMPLE_FMT_DBL: v = static_cast<float>(reinterpret_cast<const double*>(plane)[idx]); break;
          case AV_SAMPLE_FMT_S16: v = reinterpret_cast<const int16_t*>(plane)[idx] / 32768.0f; break;
          case AV_SAMPLE_FMT_S32: v = static_cast<float>(reinterpret_cast<const int32_t*>(plane)[idx] / 2147483648.0); break;
          case AV_SAMPLE_FMT_U8: v = (plane[idx] - 128) / 128.0f; break;
          case AV_SAMPLE_FMT_S64: v = static_cast<float>(reinterpret_cast<const int64_t*>(plane)[idx] / 9223372036854775808.0); break;
          default: throw FileError(path_, "unsupported sample format");
        }
        dst[size_t(i) * channels + c] = v;
      }
    }
  }

  std::string path_;
  const std::atomic<bool>* stop_ = nullptr;
  FfmpegHandles h_;  // freed even when the constructor throws
  int stream_ = -1;
  bool draining_ = false;
  int64_t packets_ = 0, bad_packets_ = 0, frames_ = 0;
};

}  // namespace

struct AudioReader::Resampler {
  soxr_t soxr = nullptr;
  double ratio = 1;
  ~Resampler() {
    if (soxr) soxr_delete(soxr);
  }
};

AudioReader::AudioReader(const std::string& path, const AudioDecodeOptions& options)
    : path_(path), options_(options) {
  {
    std::ifstream probe(path, std::ios::binary | std::ios::ate);
    if (!probe) throw FileError(path, "cannot open");
    if (probe.tellg() == 0) throw FileError(path, "empty file");
  }
  if (options.target_rate < 0) throw std::invalid_argument("target_rate must be >= 0");
  if (!options.mono && options.target_rate != 0)
    throw std::invalid_argument("multi-channel output is only available at the native rate (target_rate 0)");
  validate_riff(path);
  std::unique_ptr<AudioSource> source = SndfileSource::open(path);
  if (!source) source = std::make_unique<FfmpegSource>(path);
  start(std::move(source));
}

AudioReader::AudioReader(const StreamInput& input, const AudioDecodeOptions& options)
    : path_(stream_name(input)), options_(options), live_(true) {
  if (options.target_rate < 0) throw std::invalid_argument("target_rate must be >= 0");
  if (!options.mono && options.target_rate != 0)
    throw std::invalid_argument("multi-channel output is only available at the native rate (target_rate 0)");
  start(std::make_unique<FfmpegSource>(input));
}

bool is_raw_pcm_format(const std::string& format) {
  static const std::regex pcm("([suf](8|16|24|32|64)(le|be)?|alaw|mulaw)");
  return std::regex_match(format, pcm);
}

void AudioReader::start(std::unique_ptr<AudioSource> source) {
  const AudioDecodeOptions& options = options_;
  source_ = std::move(source);
  info_ = source_->info();
  output_rate_ = options.target_rate > 0 ? options.target_rate : info_.sample_rate;
  output_channels_ = options.mono ? 1 : info_.channels;
  native_skip_ = static_cast<int64_t>(std::llround(std::max(0.0, options.start_s) * info_.sample_rate));
  if (options.duration_s >= 0) native_left_ = static_cast<int64_t>(std::llround(options.duration_s * info_.sample_rate));
  if (output_rate_ != info_.sample_rate) {
    resampler_ = std::make_unique<Resampler>();
    soxr_error_t err = nullptr;
    soxr_io_spec_t io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
    soxr_quality_spec_t quality = soxr_quality_spec(SOXR_VHQ, 0);
    resampler_->soxr = soxr_create(info_.sample_rate, output_rate_, 1, &err, &io, &quality, nullptr);
    if (err) throw std::runtime_error(std::string("libsoxr: ") + err);
    resampler_->ratio = double(output_rate_) / info_.sample_rate;
  }
}

AudioReader::~AudioReader() = default;

bool AudioReader::pull_native() {
  std::vector<float> native;
  while (native.empty()) {
    if (!source_->read(native)) {
      check_complete();
      return false;
    }
  }
  native_decoded_ += static_cast<int64_t>(native.size() / info_.channels);
  const int C = info_.channels;
  int64_t frames = static_cast<int64_t>(native.size() / C);
  int64_t begin = 0;
  if (native_skip_ > 0) {
    begin = std::min(frames, native_skip_);
    native_skip_ -= begin;
  }
  int64_t end = frames;
  if (native_left_ >= 0) {
    end = std::min(frames, begin + native_left_);
    native_left_ -= (end - begin);
  }
  std::vector<float> chunk;
  if (options_.mono) {
    chunk.resize(end - begin);
    for (int64_t i = begin; i < end; ++i) {
      float s = 0;
      for (int c = 0; c < C; ++c) s += native[i * C + c];
      chunk[i - begin] = s / C;
    }
  } else {
    chunk.assign(native.begin() + begin * C, native.begin() + end * C);
  }
  if (!resampler_) {
    pending_.insert(pending_.end(), chunk.begin(), chunk.end());
  } else {
    size_t capacity = static_cast<size_t>(chunk.size() * resampler_->ratio) + 256;
    size_t old = pending_.size();
    pending_.resize(old + capacity);
    size_t done_in = 0, done_out = 0;
    soxr_error_t err = soxr_process(resampler_->soxr, chunk.data(), chunk.size(), &done_in, pending_.data() + old,
                                    capacity, &done_out);
    if (err) throw std::runtime_error(std::string("libsoxr: ") + err);
    pending_.resize(old + done_out);
  }
  if (native_left_ == 0) source_done_ = true;
  return true;
}

// A stream that ends well before the length its container announced is a cut-off file
// (lossy streams decode frame by frame and would otherwise return partial audio silently).
void AudioReader::check_complete() const {
  if (live_ || native_left_ >= 0 || info_.duration_s <= 0) return;  // a window, or no announced length
  const double decoded_s = double(native_decoded_) / info_.sample_rate;
  if (decoded_s < info_.duration_s * 0.98 - 0.05)
    throw FileError(path_, "truncated: decoded " + std::to_string(decoded_s) + " s of the " +
                               std::to_string(info_.duration_s) + " s the file announces");
}

size_t AudioReader::read(std::vector<float>& out, size_t max_frames) {
  const size_t want = max_frames * output_channels_;
  while (pending_.size() - pending_begin_ < want && !flushed_) {
    if (!source_done_ && pull_native()) continue;
    source_done_ = true;
    if (resampler_) {  // drain the resampler's tail
      while (true) {
        size_t old = pending_.size();
        pending_.resize(old + 4096);
        size_t done_out = 0;
        soxr_process(resampler_->soxr, nullptr, 0, nullptr, pending_.data() + old, 4096, &done_out);
        pending_.resize(old + done_out);
        if (done_out == 0) break;
      }
    }
    flushed_ = true;
  }
  size_t n = std::min(want, pending_.size() - pending_begin_);
  n -= n % output_channels_;
  out.insert(out.end(), pending_.begin() + pending_begin_, pending_.begin() + pending_begin_ + n);
  pending_begin_ += n;
  if (pending_begin_ > (1u << 20)) {  // keep memory bounded
    pending_.erase(pending_.begin(), pending_.begin() + pending_begin_);
    pending_begin_ = 0;
  }
  position_ += n / output_channels_;
  return n / output_channels_;
}

std::vector<std::pair<double, double>> window_spans(double duration_s, double window_s, double hop_s) {
  if (!(window_s > 0) || !(hop_s > 0)) throw std::invalid_argument("window and hop must be positive seconds");
  std::vector<std::pair<double, double>> spans;
  if (!(duration_s > 0)) return spans;
  for (double start = 0; start < duration_s; start += hop_s) {
    spans.emplace_back(start, std::min(duration_s, start + window_s));
    if (start + window_s >= duration_s) break;
  }
  return spans;
}

void stream_windows(AudioReader& reader, double window_s, double hop_s,
                    const std::function<void(double, double, std::vector<float>&&)>& emit) {
  if (!(window_s > 0) || !(hop_s > 0)) throw std::invalid_argument("window and hop must be positive seconds");
  if (reader.output_channels() != 1) throw std::invalid_argument("stream_windows: the reader must give mono audio");
  const double rate = reader.output_rate();
  std::vector<float> held;  // samples [base, base + held.size()) of the recording
  int64_t base = 0, total = 0;
  bool ended = false, emitted = false;
  double previous_start = 0;
  std::vector<float> chunk;
  // Same arithmetic as window_spans + the whole-file cut: start += hop, sample a = start * rate.
  for (double start = 0;; start += hop_s) {
    const auto a = static_cast<int64_t>(start * rate);
    const auto b_full = static_cast<int64_t>((start + window_s) * rate);
    // Forget what no window needs any more (hop > window leaves gaps that are never kept).
    if (a > base) {
      const int64_t drop = std::min<int64_t>(a - base, static_cast<int64_t>(held.size()));
      held.erase(held.begin(), held.begin() + drop);
      base += drop;
    }
    while (!ended && total < b_full) {
      chunk.clear();
      // Never read past the window's last sample: a live stream's window is emitted the moment
      // it is complete, not when a larger read fills.
      const size_t n = reader.read(chunk, static_cast<size_t>(std::min<int64_t>(1 << 15, b_full - total)));
      if (n == 0) {
        ended = true;
        break;
      }
      const int64_t chunk_start = total;
      total += static_cast<int64_t>(n);
      const int64_t skip = std::max<int64_t>(0, std::min<int64_t>(base - chunk_start, static_cast<int64_t>(n)));
      held.insert(held.end(), chunk.begin() + skip, chunk.end());
    }
    double end = start + window_s;
    if (ended) {
      if (total == 0) throw FileError(reader.path(), "no audio samples decoded");
      const double duration = static_cast<double>(total) / rate;
      // window_spans: windows start below the duration, and the one reaching the end is the last.
      if (!(start < duration) || (emitted && previous_start + window_s >= duration)) break;
      end = std::min(duration, end);
    }
    const int64_t b = std::min<int64_t>(total, static_cast<int64_t>(end * rate));
    std::vector<float> samples;
    if (b > a) samples.assign(held.begin() + (a - base), held.begin() + (b - base));
    emit(start, end, std::move(samples));
    emitted = true;
    previous_start = start;
  }
}

Waveform decode_audio(const std::string& path, const AudioDecodeOptions& options) {
  AudioReader reader(path, options);
  Waveform w;
  w.sample_rate = reader.output_rate();
  w.channels = reader.output_channels();
  w.source = reader.info();
  while (reader.read(w.samples, 1 << 16) > 0) {
  }
  if (w.samples.empty()) throw FileError(path, "no audio samples decoded");
  return w;
}

}  // namespace prefixcap
