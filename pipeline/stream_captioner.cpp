#include "pipeline/stream_captioner.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>

#include <ATen/Parallel.h>

namespace prefixcap {

OverrunPolicy parse_overrun_policy(const std::string& name) {
  if (name == "block") return OverrunPolicy::Block;
  if (name == "drop") return OverrunPolicy::Drop;
  throw std::invalid_argument("overrun policy must be block or drop, not '" + name + "'");
}

namespace {

using Clock = std::chrono::steady_clock;

struct Pending {
  StreamChunk chunk;
  Clock::time_point ready;
  int64_t dropped_before;
};

}  // namespace

StreamSummary caption_stream(Captioner& captioner, const StreamProducer& produce, const DecodingOptions& decoding,
                             const StreamOptions& options, const std::function<void(const StreamWindow&)>& on_window) {
  if (options.max_pending < 1) throw std::invalid_argument("max_pending must be at least 1");
  if (options.batch_size < 1) throw std::invalid_argument("batch_size must be at least 1");
  const auto t0 = Clock::now();

  std::mutex mu;
  std::condition_variable changed;
  std::deque<Pending> queue;
  bool reading_done = false, captioner_failed = false;
  std::exception_ptr captioner_error;
  StreamSummary summary;

  const int threads = at::get_num_threads();  // the worker's OpenMP pool is per thread
  std::thread worker([&] {
    at::set_num_threads(threads);
    try {
      while (true) {
        std::vector<Pending> batch;
        {
          std::unique_lock<std::mutex> lock(mu);
          changed.wait(lock, [&] { return !queue.empty() || reading_done; });
          if (queue.empty()) return;
          while (!queue.empty() && static_cast<int>(batch.size()) < options.batch_size) {
            batch.push_back(std::move(queue.front()));
            queue.pop_front();
          }
        }
        changed.notify_all();  // room for the reader
        std::vector<std::vector<Caption>> captions;
        if (batch.front().chunk.frames.empty()) {
          std::vector<std::vector<float>> waves;
          for (auto& p : batch) waves.push_back(std::move(p.chunk.samples));
          captions = captioner.caption_waveforms(waves, decoding);
        } else {
          std::vector<Captioner::VisualInput> visuals;
          for (auto& p : batch) visuals.push_back(captioner.visual_from_frames(p.chunk.frames));
          captions = captioner.caption(captioner.encode_visual(visuals), decoding);
        }
        for (size_t i = 0; i < batch.size(); ++i) {
          StreamWindow w;
          w.start_s = batch[i].chunk.start_s;
          w.end_s = batch[i].chunk.end_s;
          w.captions = std::move(captions[i]);
          w.latency_ms = std::chrono::duration<double, std::milli>(Clock::now() - batch[i].ready).count();
          w.dropped_so_far = batch[i].dropped_before;
          w.batch = static_cast<int>(batch.size());
          on_window(w);
        }
        std::lock_guard<std::mutex> lock(mu);
        summary.windows += static_cast<int64_t>(batch.size());
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      captioner_error = std::current_exception();
      captioner_failed = true;
      queue.clear();
      changed.notify_all();
    }
  });

  std::exception_ptr read_error;
  try {
    produce([&](StreamChunk&& chunk) {
      std::unique_lock<std::mutex> lock(mu);
      if (options.overrun == OverrunPolicy::Block)
        changed.wait(lock, [&] { return captioner_failed || static_cast<int>(queue.size()) < options.max_pending; });
      if (captioner_failed) throw std::runtime_error("captioning stopped");  // the worker's error is rethrown below
      while (static_cast<int>(queue.size()) >= options.max_pending) {  // Drop: the oldest goes
        queue.pop_front();
        ++summary.dropped;
      }
      summary.stream_s = chunk.end_s;
      queue.push_back({std::move(chunk), Clock::now(), summary.dropped});
      lock.unlock();
      changed.notify_all();
    });
  } catch (...) {
    read_error = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    reading_done = true;
  }
  changed.notify_all();
  worker.join();
  summary.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (captioner_error) std::rethrow_exception(captioner_error);
  if (read_error) std::rethrow_exception(read_error);
  return summary;
}

StreamSummary caption_stream(Captioner& captioner, AudioReader& reader, const DecodingOptions& decoding,
                             const StreamOptions& options, const std::function<void(const StreamWindow&)>& on_window) {
  const double hop = options.hop_s > 0 ? options.hop_s : options.window_s;
  double read_s = 0;
  auto produce = [&](const std::function<void(StreamChunk&&)>& emit) {
    stream_windows(reader, options.window_s, hop, [&](double start, double end, std::vector<float>&& samples) {
      StreamChunk c;
      c.start_s = start;
      c.end_s = end;
      c.samples = std::move(samples);
      emit(std::move(c));
    });
    read_s = static_cast<double>(reader.position()) / reader.output_rate();
  };
  StreamSummary summary = caption_stream(captioner, produce, decoding, options, on_window);
  summary.stream_s = std::max(summary.stream_s, read_s);
  return summary;
}

}  // namespace prefixcap
