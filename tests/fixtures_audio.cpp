// Fixture kinds of the audio path: media decoding, the log-mel front end, CNN14.
#include <cmath>
#include <filesystem>
#include <regex>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "encoders/cnn14.h"
#include "encoders/feature_cuda.h"
#include "encoders/feature_kernels_cpu.h"
#include "encoders/log_mel.h"
#include "pipeline/audio_decode.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

namespace {

double snr_db(const std::vector<float>& y_in, const at::Tensor& ref_in, int64_t n) {
  at::Tensor ref = ref_in.to(at::kDouble).flatten().narrow(0, 0, std::min<int64_t>(n, ref_in.numel()));
  at::Tensor y = at::zeros({ref.numel()}, at::kDouble);
  int64_t m = std::min<int64_t>(ref.numel(), static_cast<int64_t>(y_in.size()));
  if (m > 0) y.narrow(0, 0, m).copy_(at::from_blob(const_cast<float*>(y_in.data()), {m}, at::kFloat).to(at::kDouble));
  double signal = ref.pow(2).sum().item<double>(), noise = (y - ref).pow(2).sum().item<double>();
  return noise == 0 ? INFINITY : 10 * std::log10(signal / noise);
}

// What the decoder must say about a broken file, from the case's description (a regex).
std::string expected_decode_error(const std::string& description) {
  static const std::pair<const char*, const char*> kReasons[] = {
      {"zero-byte", "empty"},
      {"ASCII text", "not a recognised|not an audio|no audio stream|invalid data"},
      {"file ends after", "truncated|ends early|shorter than"},
      {"claim", "truncated|ends early|shorter than"},
      {"fmt chunk size", "chunk|malformed|truncated"},
  };
  for (const auto& [needle, reason] : kReasons)
    if (description.find(needle) != std::string::npos) return reason;
  return "";
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

}  // namespace

FixtureReport run_audio_decode_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "audio-decode";
  const Golden& golden = open_golden(report, folder, cases);
  int target_rate = 32000;
  std::smatch m;
  std::string target = cases.value("target", "");
  if (std::regex_search(target, m, std::regex("(\\d+) Hz"))) target_rate = std::stoi(m[1]);
  for (const Json& c : cases.at("cases")) {
    const std::string path = (fs::path(folder) / c.at("file").get<std::string>()).string();
    const Json& expected = c.at("expected");
    report.ran.insert(c.at("name").get<std::string>());
    report.cases.push_back(run_case(c.at("name").get<std::string>(), [&]() -> std::string {
      if (expected.value("error", false))
        return expect_refusal(path, expected_decode_error(c.value("description", std::string())), [&] {
          return "decoded " + std::to_string(decode_audio(path, {target_rate}).samples.size()) + " samples";
        });
      Checks checks;
      if (c.contains("native")) {
        const Json& native = c["native"];
        AudioDecodeOptions opt;
        opt.target_rate = 0;
        opt.mono = false;
        Waveform w = decode_audio(path, opt);
        checks.require(w.sample_rate == native.at("sample_rate").get<int>(), "native rate " + std::to_string(w.sample_rate));
        at::Tensor ref = golden.tensor(native.at("tensor").get<std::string>()).to(at::kDouble) / 32768.0;
        at::Tensor got = at::from_blob(w.samples.data(), {static_cast<int64_t>(w.samples.size())}, at::kFloat)
                             .to(at::kDouble)
                             .view({-1, w.channels});
        checks.close("native samples", got, ref, 0, 0);
      }
      Waveform w = decode_audio(path, {target_rate});
      const int64_t samples = expected.at("samples").get<int64_t>();
      const int64_t tolerance = expected.value("sample_count_tolerance", 0);
      const int64_t got_n = static_cast<int64_t>(w.samples.size());
      checks.require(std::llabs(got_n - samples) <= tolerance,
                     "length " + std::to_string(got_n) + ", expected " + std::to_string(samples) + " +- " + std::to_string(tolerance));
      if (expected.contains("duration_s")) {
        double duration = double(got_n) / target_rate;
        checks.require(std::fabs(duration - expected["duration_s"].get<double>()) <= expected.value("duration_tolerance_s", 0.0),
                       "duration " + fmt(duration) + " s");
      }
      std::string ref_name = expected.contains("tensor") ? expected["tensor"].get<std::string>()
                                                         : expected.at("snr_vs").get<std::string>();
      at::Tensor ref = golden.tensor(ref_name);
      if (expected.contains("min_snr_db")) {
        double snr = snr_db(w.samples, ref, samples);
        checks.require(snr >= expected["min_snr_db"].get<double>(), "SNR " + fmt(snr) + " dB below " + fmt(expected["min_snr_db"].get<double>()));
        checks.notes.push_back("SNR " + fmt(snr) + " dB, " + std::to_string(got_n) + " samples");
      } else {  // exact: the file stores float32(ref)
        at::Tensor got = at::from_blob(w.samples.data(), {got_n}, at::kFloat).clone();
        checks.exact("bits", got.view(at::kInt), ref.to(at::kFloat).view(at::kInt));
      }
      return checks.result();
    }));
  }
  return report;
}

FixtureReport run_mel_frontend_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "mel-frontend";
  const std::string config_path = (fs::path(folder) / cases.at("config").get<std::string>()).string();
  LogMelConfig config = LogMelConfig::from_json(read_json_file(config_path), config_path);
  const Golden& golden = open_golden(report, folder, cases);
  LogMelFrontEnd front_end(config);
  for (const Json& c : cases.at("cases")) {
    report.ran.insert(c.at("name").get<std::string>());
    report.cases.push_back(run_case(c.at("name").get<std::string>(), [&]() -> std::string {
      Checks checks;
      LogMelOutput out;
      if (c.at("inputs").contains("waveform"))
        out = front_end->forward_all(golden.tensor(c["inputs"]["waveform"].at("tensor").get<std::string>()));
      for (auto it = c.at("outputs").begin(); it != c.at("outputs").end(); ++it) {
        double atol, rtol;
        tolerance_of(it.value(), &atol, &rtol, 1e-4, 1e-3);
        at::Tensor expected = golden.tensor(it.value().at("tensor").get<std::string>());
        const std::string& key = it.key();
        at::Tensor got;
        if (key == "hann_window") got = hann_window_periodic(config.window_size);
        else if (key == "mel_filterbank") got = slaney_mel_filterbank(config);
        else if (key == "power_spectrogram") got = out.power_spectrogram;
        else if (key == "mel_power") got = out.mel_power;
        else if (key == "logmel") got = out.logmel;
        else {
          checks.require(false, "unknown output '" + key + "'");
          continue;
        }
        checks.close(key, got, expected, atol, rtol);
        if (key == "logmel") {
          // The CUDA kernels' algorithm (feature_kernels.h), run on the CPU, and on a GPU when there is one.
          const at::Tensor waveform = golden.tensor(c["inputs"]["waveform"].at("tensor").get<std::string>());
          checks.close("logmel (kernel math)", log_mel_kernel_math(waveform, config), expected, atol, rtol);
          if (feature_kernels_compiled() && at::hasCUDA())
            checks.close("logmel (CUDA)", front_end->forward(waveform.to(at::kCUDA)).cpu(), expected, atol, rtol);
        }
      }
      return checks.result();
    }));
  }
  return report;
}

FixtureReport run_cnn14_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "cnn14";
  const Json& files = cases.at("model_files");
  const std::string config_path = (fs::path(folder) / files.at("config").get<std::string>()).string();
  Cnn14Config config = Cnn14Config::from_file(config_path);
  const Golden& golden = open_golden(report, folder, cases);
  double default_atol = 1e-4, default_rtol = 1e-3;
  if (cases.contains("default_tolerance")) tolerance_of(cases["default_tolerance"], &default_atol, &default_rtol, 1e-4, 1e-3);
  for (auto f = files.begin(); f != files.end(); ++f) {
    if (f.key() == "config") continue;
    std::string file = f.value().get<std::string>();
    file = file.substr(0, file.find(' '));  // "checkpoint.pth ({'model': state_dict}, ...)"
    const std::string path = (fs::path(folder) / file).string();
    Cnn14 model{nullptr};
    CaseResult load = run_case(file + "/load", [&] {
      model = Cnn14(config);
      model->load_weights(load_weight_file(path), path);
      model->freeze();
      return std::string("strict load");
    });
    report.cases.push_back(load);
    if (!load.passed) continue;
    for (const Json& c : cases.at("cases")) {
      report.ran.insert(c.at("name").get<std::string>());
      report.cases.push_back(run_case(file + "/" + c.at("name").get<std::string>(), [&]() -> std::string {
        torch::NoGradGuard no_grad;
        Checks checks;
        const Json& input = c.at("inputs").at("waveform");
        at::Tensor waveform = golden.tensor(input.at("tensor").get<std::string>());
        for (auto in = c.at("inputs").begin(); in != c.at("inputs").end(); ++in) {
          if (in.key() == "waveform") continue;
          if (in.key() != "lengths") {
            checks.require(false, "unknown input '" + in.key() + "'");
            continue;
          }
          // Valid samples per row (the reference runs on the zero-padded batch): the padding
          // must be zeros and the last valid sample not, or the lengths describe another batch.
          at::Tensor lengths = golden.tensor(in.value().at("tensor").get<std::string>()).to(at::kLong);
          checks.require(lengths.numel() == waveform.size(0), "lengths: one per waveform row expected");
          for (int64_t b = 0; b < std::min<int64_t>(lengths.numel(), waveform.size(0)); ++b) {
            const int64_t n = lengths[b].item<int64_t>();
            const bool ok = n > 0 && n <= waveform.size(1) && waveform[b][n - 1].item<float>() != 0 &&
                            (n == waveform.size(1) || waveform[b].narrow(0, n, waveform.size(1) - n).abs().max().item<float>() == 0);
            checks.require(ok, "lengths[" + std::to_string(b) + "] = " + std::to_string(n) + " does not match the zero padding of row " +
                                   std::to_string(b));
          }
        }
        if (input.contains("file")) {  // the same samples as a WAV: the decoder must give them exactly
          std::string wav = input["file"].get<std::string>();
          Waveform w = decode_audio((fs::path(folder) / wav.substr(0, wav.find(' '))).string(), {0});
          checks.close("decoded " + wav.substr(0, wav.find(' ')),
                       at::from_blob(w.samples.data(), {1, static_cast<int64_t>(w.samples.size())}, at::kFloat), waveform, 0, 0);
        }
        LogMelOutput front = model->front_end->forward_all(waveform);
        Cnn14Output out = model->forward_logmel(front.logmel, /*keep_blocks=*/true);
        for (auto it = c.at("outputs").begin(); it != c.at("outputs").end(); ++it) {
          const std::string& key = it.key();
          double atol, rtol;
          tolerance_of(it.value(), &atol, &rtol, default_atol, default_rtol);
          at::Tensor expected = golden.tensor(it.value().at("tensor").get<std::string>());
          at::Tensor got;
          if (key == "spectrogram") got = front.power_spectrogram;
          else if (key == "logmel") got = out.logmel;
          else if (key == "temporal_features") got = out.temporal_features.transpose(1, 2);  // upstream [B, C, T']
          else if (key == "embedding") got = out.embedding;
          else if (key == "clipwise_output") got = out.clipwise_output;
          else if (key.rfind("conv_block", 0) == 0) {
            size_t index = std::stoul(key.substr(10));
            if (index < 1 || index > out.blocks.size()) {
              checks.require(false, "no block " + key);
              continue;
            }
            got = out.blocks[index - 1];
          } else {
            checks.require(false, "unknown output '" + key + "'");
            continue;
          }
          checks.close(key, got, expected, atol, rtol);
        }
        return checks.result();
      }));
    }
  }
  return report;
}

}  // namespace prefixcap::fixtures
