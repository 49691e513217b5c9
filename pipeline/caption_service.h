// Dynamic batching for a caption server: requests from many threads, one captioning thread.
//
// A request is a list of units (a clip, a window of a long recording, an image, a video's
// frame features) with its decoding options. The captioning thread takes units from all waiting
// requests into one batch: it waits up to `batch_wait_ms` after the oldest waiting unit for
// more to arrive (or until `max_batch` are waiting), then takes the oldest unit's kind — same
// decoding options, and for audio the same clip length, so the batch is one encoder call and one
// decoder call and no caption depends on its batch-mates — and fills the batch round-robin over
// the requests in arrival order, one unit from each in turn. A long recording's windows thus
// interleave with short requests instead of holding them up.
//
// The queue is bounded (`max_queue` units waiting): a request that does not fit is refused with
// QueueFull, which says how long the backlog should take to clear.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "pipeline/captioner.h"

namespace prefixcap {

struct ServiceUnit {
  std::vector<float> waveform;          // CNN14 bundles: mono samples at the encoder's rate
  Captioner::VisualInput visual;        // CLIP bundles: an image, or a video's frame features
  double start_s = -1, end_s = -1;      // a window of a longer recording, or -1
};

struct ServiceOptions {
  int max_batch = 16;         // units per batch, at most
  double batch_wait_ms = 5;   // how long a batch waits for company after its oldest unit
  int64_t max_queue = 1024;   // units waiting, at most
};

class QueueFull : public std::runtime_error {
 public:
  QueueFull(const std::string& what, double retry_after_s) : std::runtime_error(what), retry_after_s(retry_after_s) {}
  double retry_after_s;
};

struct ServiceStats {
  int64_t queued_units = 0;     // waiting, not yet in a batch
  int64_t active_requests = 0;  // submitted, not finished
  int64_t batches = 0;
  int64_t units = 0;            // captioned
  std::vector<int64_t> batch_sizes;  // [n] = batches of n units (index 0 unused)
  double busy_s = 0;            // time spent captioning
};

class CaptionService {
 public:
  struct Request;  // one submitted request (opaque)

  CaptionService(Captioner& captioner, const ServiceOptions& options);
  ~CaptionService();  // drains: finishes what was submitted, then stops
  CaptionService(const CaptionService&) = delete;
  CaptionService& operator=(const CaptionService&) = delete;

  // Queues a request; throws QueueFull when its units do not fit behind the waiting ones,
  // std::length_error when they could never fit, std::runtime_error after drain().
  std::shared_ptr<Request> submit(std::vector<ServiceUnit> units, const DecodingOptions& options);
  // Waits until the request is done or `timeout` passes; false on timeout.
  bool wait(const std::shared_ptr<Request>& request, std::chrono::duration<double> timeout);
  // The captions of a finished request, one list (best first) per unit; throws the captioning
  // error if its batch failed.
  std::vector<std::vector<Caption>> results(const std::shared_ptr<Request>& request);
  // How long the request's units waited before their first batch, in ms (-1 before it started).
  double queue_ms(const std::shared_ptr<Request>& request);
  // Takes the request's units that are still waiting out of the queue (after a timeout).
  void cancel(const std::shared_ptr<Request>& request);

  // Stops taking requests; the waiting ones are still captioned.
  void drain();
  ServiceStats stats();

 private:
  void run();
  Captioner& captioner_;
  ServiceOptions options_;
  std::mutex mu_;
  std::condition_variable work_;  // units arrived, or stopping
  std::condition_variable done_;  // a request finished
  std::vector<std::shared_ptr<Request>> active_;  // in arrival order, with units still waiting
  int64_t next_id_ = 0;
  bool accepting_ = true, stopping_ = false;
  ServiceStats stats_;
  double unit_seconds_ = 0;  // running mean of the captioning time per unit (for Retry-After)
  std::thread worker_;
};

}  // namespace prefixcap
