// CaptionService without HTTP: batches across requests, round-robin fairness, the bounded queue,
// cancellation and draining (also run under ASan + UBSan with the fast tests).
#include <gtest/gtest.h>

#include <cmath>
#include <future>
#include <thread>

#include "pipeline/caption_service.h"
#include "tests/test_bundles.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::aac_bundle;

namespace {

std::vector<float> tone(double seconds, int rate, float f) {
  std::vector<float> w(static_cast<size_t>(seconds * rate));
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.3f * std::sin(f * static_cast<float>(i)) * std::cos(0.0007f * i);
  return w;
}

std::vector<ServiceUnit> clips(int n, double seconds, int rate, float f0) {
  std::vector<ServiceUnit> units(n);
  for (int i = 0; i < n; ++i) units[i].waveform = tone(seconds, rate, f0 + 0.003f * i);
  return units;
}

Captioner& captioner() {
  static Captioner c = Captioner::load(aac_bundle());
  return c;
}

}  // namespace

TEST(CaptionService, ConcurrentRequestsShareBatchesAndGetTheirOwnCaptions) {
  Captioner& c = captioner();
  DecodingOptions o = c.default_decoding();
  o.beam_size = 2;
  o.max_tokens = 6;
  std::vector<std::vector<ServiceUnit>> requests;
  for (int r = 0; r < 6; ++r) requests.push_back(clips(1 + r % 2, 1.0, c.sample_rate(), 0.01f + 0.01f * r));
  // Alone, one by one.
  std::vector<std::vector<std::vector<Caption>>> alone;
  for (const auto& units : requests) {
    std::vector<std::vector<float>> w;
    for (const auto& u : units) w.push_back(u.waveform);
    alone.push_back(c.caption_waveforms(w, o));
  }
  CaptionService service(c, {8, 100.0, 64});
  std::vector<std::future<std::vector<std::vector<Caption>>>> answers;
  for (auto& units : requests)
    answers.push_back(std::async(std::launch::async, [&service, &o, units]() mutable {
      auto r = service.submit(std::move(units), o);
      EXPECT_TRUE(service.wait(r, std::chrono::seconds(120)));
      EXPECT_GE(service.queue_ms(r), 0.0);
      return service.results(r);
    }));
  for (size_t r = 0; r < answers.size(); ++r) {
    auto got = answers[r].get();
    ASSERT_EQ(got.size(), alone[r].size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i][0].ids, alone[r][i][0].ids) << "request " << r << " unit " << i;
      EXPECT_NEAR(got[i][0].score, alone[r][i][0].score, 1e-4);
    }
  }
  ServiceStats st = service.stats();
  EXPECT_EQ(st.units, 9);
  EXPECT_LT(st.batches, 9);  // some batch held units of several requests
  EXPECT_EQ(st.queued_units, 0);
  EXPECT_EQ(st.active_requests, 0);
}

TEST(CaptionService, BatchesTakeOneUnitFromEachRequestInTurn) {
  Captioner& c = captioner();
  DecodingOptions o = c.default_decoding();
  o.beam_size = 1;
  o.max_tokens = 3;
  CaptionService service(c, {4, 50.0, 64});
  auto long_request = service.submit(clips(40, 0.5, c.sample_rate(), 0.02f), o);
  auto short_request = service.submit(clips(1, 0.5, c.sample_rate(), 0.05f), o);
  ASSERT_TRUE(service.wait(short_request, std::chrono::seconds(60)));
  // The short request rode in one of the first two batches, beside the long one's windows, so it
  // is done while most of the long one still waits (first-come-first-served would finish it last).
  EXPECT_FALSE(service.wait(long_request, std::chrono::seconds(0)));
  ASSERT_TRUE(service.wait(long_request, std::chrono::seconds(60)));
  EXPECT_EQ(service.results(long_request).size(), 40u);
  EXPECT_EQ(service.stats().batch_sizes[4], 10);  // 41 units in ten batches of 4 and one of 1
  EXPECT_EQ(service.stats().batch_sizes[1], 1);
}

TEST(CaptionService, TheQueueIsBoundedAndCancelWithdrawsWhatWaits) {
  Captioner& c = captioner();
  DecodingOptions o = c.default_decoding();
  o.max_tokens = 4;
  CaptionService service(c, {1, 0.0, 5});
  EXPECT_THROW(service.submit(clips(6, 0.5, c.sample_rate(), 0.01f), o), std::length_error);
  EXPECT_THROW(service.submit({}, o), std::invalid_argument);
  DecodingOptions bad = o;
  bad.beam_size = 0;
  EXPECT_THROW(service.submit(clips(1, 0.5, c.sample_rate(), 0.01f), bad), std::invalid_argument);
  auto first = service.submit(clips(5, 0.5, c.sample_rate(), 0.01f), o);
  try {
    service.submit(clips(5, 0.5, c.sample_rate(), 0.02f), o);
    ADD_FAILURE() << "a full queue took more";
  } catch (const QueueFull& e) {
    EXPECT_GE(e.retry_after_s, 1.0);
    EXPECT_NE(std::string(e.what()).find("queue is full"), std::string::npos);
  }
  service.cancel(first);
  EXPECT_TRUE(service.wait(first, std::chrono::seconds(60)));  // done: its waiting units withdrawn
  // Room again once the withdrawn units have left the queue.
  auto second = service.submit(clips(3, 0.5, c.sample_rate(), 0.03f), o);
  ASSERT_TRUE(service.wait(second, std::chrono::seconds(60)));
  EXPECT_EQ(service.results(second).size(), 3u);
  ServiceStats st = service.stats();
  EXPECT_EQ(st.queued_units, 0);
  EXPECT_EQ(st.active_requests, 0);
  EXPECT_LE(st.units, 5);  // of `first`, at most the unit already in a batch was captioned
}

TEST(CaptionService, DrainRefusesNewRequestsAndFinishesTheQueuedOnes) {
  Captioner& c = captioner();
  DecodingOptions o = c.default_decoding();
  o.max_tokens = 4;
  std::shared_ptr<CaptionService::Request> queued;
  auto service = std::make_unique<CaptionService>(c, ServiceOptions{2, 0.0, 64});
  queued = service->submit(clips(6, 0.5, c.sample_rate(), 0.01f), o);
  service->drain();
  EXPECT_THROW(service->submit(clips(1, 0.5, c.sample_rate(), 0.01f), o), std::runtime_error);
  ASSERT_TRUE(service->wait(queued, std::chrono::seconds(60)));  // still captioned after drain()
  EXPECT_EQ(service->results(queued).size(), 6u);
  // The destructor stops the thread even with a request queued.
  service->drain();
  auto again = std::make_unique<CaptionService>(c, ServiceOptions{2, 0.0, 64});
  auto pending = again->submit(clips(4, 0.5, c.sample_rate(), 0.02f), o);
  again.reset();
  EXPECT_EQ(pending.use_count(), 1);  // the service let go of it
}
