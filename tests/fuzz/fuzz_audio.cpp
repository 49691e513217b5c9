// Media decoding (libsndfile / FFmpeg probing, our RIFF checks, resampling, downmix) on any bytes.
#include "core/errors.h"
#include "pipeline/audio_decode.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = prefixcap::fuzz::as_file(data, size);
  try {
    prefixcap::AudioDecodeOptions options;
    options.target_rate = 16000;
    options.duration_s = 30;  // a lying header must not make one input run for minutes
    prefixcap::Waveform w = prefixcap::decode_audio(path, options);
    (void)w;
  } catch (const prefixcap::FileError&) {
  }
  return 0;
}
