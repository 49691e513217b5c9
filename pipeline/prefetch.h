// An ordered parallel map with back-pressure: worker threads compute produce(i) for
// i = 0..n-1, at most `window` items ahead of the consumer, and next() hands the results out
// strictly in index order, so that what a training step sees never depends on thread timing.
// An exception thrown by produce(i) is rethrown by the next() that reaches item i.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace prefixcap {

template <typename T>
class OrderedPrefetcher {
 public:
  // workers = 0 computes each item in next() on the calling thread.
  OrderedPrefetcher(int64_t n, std::function<T(int64_t)> produce, int workers, int64_t window)
      : n_(n), produce_(std::move(produce)), window_(window < 1 ? 1 : window) {
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this] { work(); });
  }
  ~OrderedPrefetcher() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  OrderedPrefetcher(const OrderedPrefetcher&) = delete;
  OrderedPrefetcher& operator=(const OrderedPrefetcher&) = delete;

  // The next item in order, or nullopt after the last.
  std::optional<T> next() {
    if (threads_.empty()) {
      if (consumed_ >= n_) return std::nullopt;
      return produce_(consumed_++);
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (consumed_ >= n_) return std::nullopt;
    const int64_t want = consumed_++;
    cv_.notify_all();  // the window moved: a worker may claim one more
    cv_.wait(lock, [&] { return done_.count(want) > 0; });
    Slot slot = std::move(done_.at(want));
    done_.erase(want);
    lock.unlock();
    if (slot.error) std::rethrow_exception(slot.error);
    return std::move(slot.value);
  }

 private:
  struct Slot {
    std::optional<T> value;
    std::exception_ptr error;
  };
  void work() {
    for (;;) {
      int64_t i;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || claimed_ >= n_ || claimed_ < consumed_ + window_; });
        if (stop_ || claimed_ >= n_) return;
        i = claimed_++;
      }
      Slot slot;
      try {
        slot.value.emplace(produce_(i));
      } catch (...) {
        slot.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.emplace(i, std::move(slot));
      }
      cv_.notify_all();
    }
  }

  const int64_t n_;
  std::function<T(int64_t)> produce_;
  const int64_t window_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<int64_t, Slot> done_;
  int64_t claimed_ = 0;
  int64_t consumed_ = 0;  // items handed out or being waited for (under the mutex)
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace prefixcap
