#include "pipeline/caption_service.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <ATen/Parallel.h>

namespace prefixcap {

using Clock = std::chrono::steady_clock;

struct CaptionService::Request {
  int64_t id = 0;
  std::vector<ServiceUnit> units;
  std::vector<std::string> keys;  // units batch together only with units of the same key
  DecodingOptions options;
  size_t next = 0;       // units before this one are taken (or dropped)
  size_t finished = 0;   // units captioned
  size_t dropped = 0;    // units cancelled before they were taken
  std::vector<std::vector<Caption>> results;
  std::exception_ptr error;
  Clock::time_point submitted;
  double queue_ms = -1;
  bool done() const { return error || finished + dropped == units.size(); }
};

namespace {

std::string options_key(const DecodingOptions& o, int64_t request_id) {
  std::ostringstream k;
  k.precision(17);
  k << o.beam_size << '/' << o.max_tokens << '/' << o.num_return << '/' << o.sample << '/' << o.temperature << '/'
    << o.top_k << '/' << o.top_p << '/' << o.seed << '/';
  for (int64_t id : o.stop_token_ids) k << id << ',';
  // Sampling draws from one random stream per batch: a sampled request batches with nothing
  // else, so its seed gives the same captions whoever else is waiting.
  if (o.sample) k << "#" << request_id;
  return k.str();
}

}  // namespace

CaptionService::CaptionService(Captioner& captioner, const ServiceOptions& options)
    : captioner_(captioner), options_(options) {
  if (options_.max_batch < 1) throw std::invalid_argument("max_batch must be at least 1");
  if (options_.max_queue < 1) throw std::invalid_argument("max_queue must be at least 1");
  if (!(options_.batch_wait_ms >= 0)) throw std::invalid_argument("batch_wait_ms must be >= 0");
  stats_.batch_sizes.assign(options_.max_batch + 1, 0);
  const int threads = at::get_num_threads();  // OpenMP's thread count is per thread
  worker_ = std::thread([this, threads] {
    at::set_num_threads(threads);
    run();
  });
}

CaptionService::~CaptionService() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    accepting_ = false;
    stopping_ = true;
  }
  work_.notify_all();
  worker_.join();
}

std::shared_ptr<CaptionService::Request> CaptionService::submit(std::vector<ServiceUnit> units, const DecodingOptions& options) {
  if (units.empty()) throw std::invalid_argument("a request needs at least one unit");
  validate(options);
  auto r = std::make_shared<Request>();
  std::lock_guard<std::mutex> lock(mu_);
  if (!accepting_) throw std::runtime_error("the server is shutting down");
  const auto n = static_cast<int64_t>(units.size());
  if (n > options_.max_queue)
    throw std::length_error("the request has " + std::to_string(n) + " clips or windows; the queue holds " +
                            std::to_string(options_.max_queue));
  if (stats_.queued_units + n > options_.max_queue) {
    const double backlog_s = static_cast<double>(stats_.queued_units) * std::max(unit_seconds_, 1e-3);
    throw QueueFull("the queue is full (" + std::to_string(stats_.queued_units) + " clips or windows waiting)",
                    std::max(1.0, std::ceil(backlog_s)));
  }
  r->id = next_id_++;
  r->options = options;
  const std::string key = options_key(options, r->id);
  for (const auto& u : units)
    r->keys.push_back(key + "|" + (u.waveform.empty() ? std::string("visual") : std::to_string(captioner_.fitted_length(u.waveform.size()))));
  r->units = std::move(units);
  r->results.resize(r->units.size());
  r->submitted = Clock::now();
  active_.push_back(r);
  stats_.queued_units += n;
  ++stats_.active_requests;
  work_.notify_all();
  return r;
}

bool CaptionService::wait(const std::shared_ptr<Request>& r, std::chrono::duration<double> timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return done_.wait_for(lock, timeout, [&] { return r->done(); });
}

std::vector<std::vector<Caption>> CaptionService::results(const std::shared_ptr<Request>& r) {
  std::lock_guard<std::mutex> lock(mu_);
  if (r->error) std::rethrow_exception(r->error);
  if (!r->done()) throw std::logic_error("results() before the request finished");
  return std::move(r->results);
}

double CaptionService::queue_ms(const std::shared_ptr<Request>& r) {
  std::lock_guard<std::mutex> lock(mu_);
  return r->queue_ms;
}

void CaptionService::cancel(const std::shared_ptr<Request>& r) {
  std::lock_guard<std::mutex> lock(mu_);
  if (r->next < r->units.size()) {
    const size_t left = r->units.size() - r->next;
    r->dropped += left;
    r->next = r->units.size();
    stats_.queued_units -= static_cast<int64_t>(left);
    active_.erase(std::remove(active_.begin(), active_.end(), r), active_.end());
    if (r->done()) --stats_.active_requests;
  }
  done_.notify_all();
}

void CaptionService::drain() {
  std::lock_guard<std::mutex> lock(mu_);
  accepting_ = false;
}

ServiceStats CaptionService::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CaptionService::run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    work_.wait(lock, [&] { return stats_.queued_units > 0 || stopping_; });
    if (stats_.queued_units == 0) return;  // stopping, and nothing waits
    // Company: wait for more units until max_batch wait, or the oldest has waited long enough.
    const auto deadline = active_.front()->submitted + std::chrono::duration_cast<Clock::duration>(
                                                           std::chrono::duration<double, std::milli>(options_.batch_wait_ms));
    while (stats_.queued_units < options_.max_batch && !stopping_ && Clock::now() < deadline)
      work_.wait_until(lock, deadline);
    if (active_.empty()) continue;  // cancelled meanwhile

    // The oldest waiting unit sets the kind; round-robin over the requests fills the batch.
    const std::string key = active_.front()->keys[active_.front()->next];
    std::vector<std::pair<std::shared_ptr<Request>, size_t>> batch;
    for (bool progress = true; progress && static_cast<int>(batch.size()) < options_.max_batch;) {
      progress = false;
      for (auto& r : active_) {
        if (static_cast<int>(batch.size()) >= options_.max_batch) break;
        if (r->next < r->units.size() && r->keys[r->next] == key) {
          batch.emplace_back(r, r->next++);
          progress = true;
        }
      }
    }
    const auto now = Clock::now();
    for (auto& [r, i] : batch)
      if (r->queue_ms < 0) r->queue_ms = std::chrono::duration<double, std::milli>(now - r->submitted).count();
    stats_.queued_units -= static_cast<int64_t>(batch.size());
    active_.erase(std::remove_if(active_.begin(), active_.end(), [](const auto& r) { return r->next >= r->units.size(); }),
                  active_.end());
    lock.unlock();

    // Captioning, outside the lock: the units taken belong to this thread now.
    std::vector<std::vector<Caption>> captions;
    std::exception_ptr error;
    const DecodingOptions options = batch.front().first->options;
    try {
      if (!batch.front().first->units[batch.front().second].waveform.empty()) {
        std::vector<std::vector<float>> waves;
        for (auto& [r, i] : batch) waves.push_back(std::move(r->units[i].waveform));
        captions = captioner_.caption_waveforms(waves, options);
      } else {
        std::vector<Captioner::VisualInput> visuals;
        for (auto& [r, i] : batch) visuals.push_back(std::move(r->units[i].visual));
        captions = captioner_.caption(captioner_.encode_visual(visuals), options);
      }
    } catch (...) {
      error = std::current_exception();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - now).count();

    lock.lock();
    for (size_t k = 0; k < batch.size(); ++k) {
      auto& [r, i] = batch[k];
      const bool was_done = r->done();
      if (error) {
        if (!r->error) r->error = error;
        if (r->next < r->units.size()) {  // the rest of a failed request is not captioned
          const size_t left = r->units.size() - r->next;
          r->dropped += left;
          r->next = r->units.size();
          stats_.queued_units -= static_cast<int64_t>(left);
          active_.erase(std::remove(active_.begin(), active_.end(), r), active_.end());
        }
      } else {
        r->results[i] = std::move(captions[k]);
      }
      ++r->finished;
      if (!was_done && r->done()) --stats_.active_requests;
    }
    ++stats_.batches;
    stats_.units += static_cast<int64_t>(batch.size());
    ++stats_.batch_sizes[batch.size()];
    stats_.busy_s += seconds;
    const double per_unit = seconds / static_cast<double>(batch.size());
    unit_seconds_ = unit_seconds_ == 0 ? per_unit : 0.9 * unit_seconds_ + 0.1 * per_unit;
    done_.notify_all();
  }
}

}  // namespace prefixcap
