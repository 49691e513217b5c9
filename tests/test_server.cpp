// caption-server over real HTTP on loopback: captions equal the caption CLI's, concurrent
// requests share batches without changing their captions, a short request overtakes a long
// one, every malformed request gets its 4xx JSON error, SIGTERM drains what is in flight.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sndfile.h>
#include <sys/socket.h>

#include <cmath>
#include <fstream>
#include <future>
#include <random>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "tests/test_bundles.h"
#include "tests/test_helpers.h"
#include "tests/test_process.h"

using namespace prefixcap;
using prefixcap::testing::aac_bundle;
using prefixcap::testing::Child;
using prefixcap::testing::clipcap_bundle;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::read_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::q;
using Json = nlohmann::json;

namespace {

const std::string kServer = PREFIXCAP_SERVER_BIN;
const std::string kCaption = PREFIXCAP_CAPTION_BIN;

std::string wav_bytes(const TempDir& dir, const std::string& name, double seconds, uint32_t seed, int rate = 16000) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.2f);
  std::vector<float> x(static_cast<size_t>(seconds * rate));
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::max(-1.0f, std::min(1.0f, n(rng) + 0.3f * std::sin(0.02f * i * (1 + seed % 5))));
  const std::string path = dir.file(name);
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = 1;
  info.format = SF_FORMAT_WAV | SF_FORMAT_PCM_16;
  SNDFILE* f = sf_open(path.c_str(), SFM_WRITE, &info);
  sf_writef_float(f, x.data(), static_cast<sf_count_t>(x.size()));
  sf_close(f);
  return path;
}

std::string base64(const std::string& in) {
  static const char* chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    for (int k = 3; k >= 0; --k) out += chars[(v >> (6 * k)) & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += chars[(v >> 18) & 63];
    out += chars[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += chars[(v >> 18) & 63];
    out += chars[(v >> 12) & 63];
    out += chars[(v >> 6) & 63];
    out += '=';
  }
  return out;
}


// caption's JSON lines for one file.
std::vector<Json> cli_captions(const TempDir& dir, const std::string& bundle, const std::string& file, const std::string& args) {
  const std::string out = dir.file("cli.jsonl");
  const int rc = std::system((kCaption + " -m " + q(bundle) + " " + q(file) + " -f jsonl -o " + q(out) + " " + args + " 2>/dev/null").c_str());
  EXPECT_EQ(rc, 0);
  std::vector<Json> lines;
  std::ifstream in(out);
  std::string line;
  while (std::getline(in, line)) lines.push_back(Json::parse(line));
  return lines;
}

// A caption-server on a free loopback port, stopped with the test.
class Server {
 public:
  Server(const std::string& bundle, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv = {kServer, "-m", bundle, "--port", "0", "--threads", "2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    child_ = std::make_unique<Child>(argv, dir_.file("out"), dir_.file("err"));
    port_ = prefixcap::testing::listening_port(*child_, dir_.file("out"));
    if (port_ == 0) throw std::runtime_error("caption-server did not start: " + read_bytes(dir_.file("err")));
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(120, 0);
    return c;
  }
  Child& process() { return *child_; }
  std::string stderr_text() const { return read_bytes(dir_.file("err")); }
  int port() const { return port_; }

 private:
  TempDir dir_;
  std::unique_ptr<Child> child_;
  int port_ = 0;
};

Json post_json(httplib::Client& c, const Json& body, int expected_status, const httplib::Headers& headers = {}) {
  auto res = c.Post("/v1/captions", headers, body.dump(), "application/json");
  EXPECT_TRUE(res) << "no response";
  if (!res) return Json();
  EXPECT_EQ(res->status, expected_status) << res->body;
  EXPECT_EQ(res->get_header_value("Content-Type"), "application/json");
  return Json::parse(res->body);
}

// The queue depth /health reports (-1 without an answer).
int queue_depth(httplib::Client& c) {
  auto h = c.Get("/health");
  if (!h) return -1;
  const Json j = Json::parse(h->body, nullptr, false);
  return j.is_object() ? j.value("queue_depth", -1) : -1;
}

// Polls /health until `ok(queue depth)` or about 5 s pass; returns the last depth.
template <typename Ok>
int wait_for_queue(httplib::Client& c, Ok ok) {
  int depth = queue_depth(c);
  for (int i = 0; i < 500 && !ok(depth); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    depth = queue_depth(c);
  }
  return depth;
}

httplib::MultipartFormDataItems upload(const std::string& bytes, const std::string& name,
                                       const std::vector<std::pair<std::string, std::string>>& fields = {}) {
  httplib::MultipartFormDataItems items = {{"file", bytes, name, "application/octet-stream"}};
  for (const auto& [k, v] : fields) items.push_back({k, v, "", ""});
  return items;
}

Json post_upload(httplib::Client& c, const httplib::MultipartFormDataItems& items, int expected_status) {
  auto res = c.Post("/v1/captions", items);
  EXPECT_TRUE(res) << "no response";
  if (!res) return Json();
  EXPECT_EQ(res->status, expected_status) << res->body;
  return Json::parse(res->body);
}

void expect_same(const std::vector<Json>& cli, const Json& server_results, double score_tolerance) {
  ASSERT_EQ(cli.size(), server_results.size());
  for (size_t i = 0; i < cli.size(); ++i) {
    SCOPED_TRACE("result " + std::to_string(i));
    EXPECT_EQ(server_results[i]["caption"], cli[i]["caption"]);
    EXPECT_NEAR(server_results[i]["score"].get<double>(), cli[i]["score"].get<double>(), score_tolerance);
    EXPECT_EQ(server_results[i].contains("start"), cli[i].contains("start"));
    if (cli[i].contains("start")) {
      EXPECT_DOUBLE_EQ(server_results[i]["start"].get<double>(), cli[i]["start"].get<double>());
      EXPECT_DOUBLE_EQ(server_results[i]["end"].get<double>(), cli[i]["end"].get<double>());
    }
    EXPECT_EQ(server_results[i]["alternatives"].size(), cli[i]["alternatives"].size());
  }
}

int64_t metric(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + " ", 0) == 0) return std::stoll(line.substr(name.size() + 1));
  return -1;
}

}  // namespace

class CaptionServer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }
};

TEST_F(CaptionServer, UploadsBase64AndPathsGiveTheCaptionsOfTheCli) {
  TempDir dir;
  const std::string wav = wav_bytes(dir, "clip.wav", 7.3, 1);
  Server server(aac_bundle(), {"--allow-path", dir.path()});
  auto c = server.client();

  auto health = c.Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(Json::parse(health->body)["status"], "ok");
  auto models = c.Get("/v1/models");
  ASSERT_TRUE(models);
  Json m = Json::parse(models->body)["models"][0];
  EXPECT_EQ(m["encoder"], "cnn14");
  EXPECT_EQ(m["sample_rate"], 16000);
  EXPECT_EQ(m["decoding"]["beam_size"], 5);

  // Whole clip, k-best: one request alone in its batch gives the CLI's numbers exactly.
  auto cli = cli_captions(dir, aac_bundle(), wav, "-k 2");
  Json body = post_upload(c, upload(read_bytes(wav), "clip.wav", {{"num_captions", "2"}}), 200);
  expect_same(cli, body["results"], 1e-9);
  EXPECT_EQ(body["results"][0]["path"], "clip.wav");
  EXPECT_EQ(body["results"][0]["modality"], "audio");
  EXPECT_GE(body["timings"]["queue_ms"].get<double>(), 0.0);

  Json b64 = post_json(c, {{"media", base64(read_bytes(wav))}, {"filename", "x.wav"}, {"num_captions", 2}}, 200);
  expect_same(cli, b64["results"], 1e-9);
  Json by_path = post_json(c, {{"path", wav}, {"num_captions", 2}}, 200);
  expect_same(cli, by_path["results"], 1e-9);
  EXPECT_EQ(by_path["results"][0]["path"], wav);

  // Windows: the same cut as caption --window; the windows of one request share batches, so
  // the scores agree to the float noise of other batch sizes.
  auto cli_windows = cli_captions(dir, aac_bundle(), wav, "--window 2 --hop 1.5 -b 16");
  Json windows = post_json(c, {{"path", wav}, {"window", 2}, {"hop", 1.5}}, 200);
  expect_same(cli_windows, windows["results"], 1e-4);

  // Greedy and a token limit reach the decoder.
  auto cli_greedy = cli_captions(dir, aac_bundle(), wav, "--greedy --max-tokens 4");
  Json greedy = post_json(c, {{"path", wav}, {"greedy", true}, {"max_tokens", 4}}, 200);
  expect_same(cli_greedy, greedy["results"], 1e-9);
}

TEST_F(CaptionServer, ImagesThroughAClipBundle) {
  TempDir dir;
  const std::string png = fixture_dir("clip-vit-tiny") + "/astronaut.png";
  Server server(clipcap_bundle());
  auto c = server.client();
  auto cli = cli_captions(dir, clipcap_bundle(), png, "--max-tokens 20");
  Json body = post_upload(c, upload(read_bytes(png), "astronaut.png", {{"max_tokens", "20"}}), 200);
  expect_same(cli, body["results"], 1e-9);
  EXPECT_EQ(body["results"][0]["modality"], "image");
  // An audio file to an image captioner: 415.
  const std::string wav = wav_bytes(dir, "a.wav", 1, 2);
  Json wrong = post_upload(c, upload(read_bytes(wav), "a.wav"), 415);
  EXPECT_NE(wrong["error"]["message"].get<std::string>().find("is audio"), std::string::npos);
}

TEST_F(CaptionServer, ConcurrentRequestsShareBatchesAndKeepTheirCaptions) {
  TempDir dir;
  std::vector<std::string> files;
  for (int i = 0; i < 8; ++i) files.push_back(read_bytes(wav_bytes(dir, "c" + std::to_string(i) + ".wav", 3.0 + 0.5 * (i % 3), 10 + i)));
  // Solo answers first (batch of one each), from a server that cannot batch.
  std::vector<Json> solo;
  {
    Server one(aac_bundle(), {"--max-batch", "1"});
    auto c = one.client();
    for (int i = 0; i < 8; ++i) solo.push_back(post_json(c, {{"media", base64(files[i])}}, 200)["results"]);
  }
  Server server(aac_bundle(), {"--max-batch", "8", "--batch-wait-ms", "200"});
  std::vector<std::future<Json>> answers;
  for (int i = 0; i < 8; ++i)
    answers.push_back(std::async(std::launch::async, [&, i] {
      auto c = server.client();
      return post_json(c, {{"media", base64(files[i])}}, 200)["results"];
    }));
  for (int i = 0; i < 8; ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    Json r = answers[i].get();
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0]["caption"], solo[i][0]["caption"]);
    EXPECT_NEAR(r[0]["score"].get<double>(), solo[i][0]["score"].get<double>(), 1e-4);
  }
  auto c = server.client();
  // The request counter is bumped by the server's logger after each response is written, so
  // the last one may still be on its way when the client has its answer: wait for it (2 s).
  const std::string served = "prefixcap_http_requests_total{route=\"/v1/captions\",status=\"200\"} 8";
  std::string metrics = c.Get("/metrics")->body;
  for (int i = 0; i < 40 && metrics.find(served) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    metrics = c.Get("/metrics")->body;
  }
  const int64_t batches = metric(metrics, "prefixcap_batch_size_count");
  const int64_t units = metric(metrics, "prefixcap_batch_size_sum");
  EXPECT_EQ(units, 8);
  // Three clip lengths: at most one batch per length if they all arrived within 200 ms.
  EXPECT_LE(batches, 4) << metrics;
  EXPECT_GT(metric(metrics, "prefixcap_media_seconds_total"), 20);
  EXPECT_NE(metrics.find(served), std::string::npos) << metrics;
}

TEST_F(CaptionServer, AShortRequestOvertakesALongOne) {
  TempDir dir;
  const std::string long_wav = wav_bytes(dir, "long.wav", 120, 3);
  const std::string short_wav = wav_bytes(dir, "short.wav", 2, 4);
  Server server(aac_bundle(), {"--max-batch", "2", "--allow-path", dir.path()});
  std::atomic<int> order{0};
  int long_done = -1, short_done = -1;
  std::thread long_client([&] {
    auto c = server.client();
    Json r = post_json(c, {{"path", long_wav}, {"window", 1}}, 200);  // 120 windows
    EXPECT_EQ(r["results"].size(), 120u);
    long_done = order++;
  });
  // Once the long request's windows are queued, the short one is sent.
  auto c = server.client();
  wait_for_queue(c, [](int depth) { return depth > 0; });
  Json r = post_json(c, {{"path", short_wav}}, 200);
  short_done = order++;
  long_client.join();
  EXPECT_EQ(short_done, 0);
  EXPECT_EQ(long_done, 1);
  EXPECT_LT(r["timings"]["queue_ms"].get<double>(), 5000.0);
  // Past --split-over (30 s) without a window: windows of --default-window (10 s), as
  // caption --window 10 cuts them.
  Json split = post_json(c, {{"path", long_wav}, {"greedy", true}}, 200);
  auto cli = cli_captions(dir, aac_bundle(), long_wav, "--window 10 --greedy -b 16");
  expect_same(cli, split["results"], 1e-4);
  ASSERT_EQ(split["results"].size(), 12u);
  EXPECT_DOUBLE_EQ(split["results"][11]["end"].get<double>(), 120.0);
}

TEST_F(CaptionServer, MalformedRequestsGetTheir4xxAndTheServerStaysUp) {
  TempDir dir;
  const std::string wav = wav_bytes(dir, "ok.wav", 3, 5);
  const std::string long_wav = wav_bytes(dir, "long.wav", 40, 6);
  Server server(aac_bundle(), {"--allow-path", dir.path(), "--max-body-mb", "1", "--max-duration", "35",
                               "--max-queue", "6", "--max-batch", "1", "--api-key", "sekret"});
  auto c = server.client();
  const httplib::Headers auth = {{"Authorization", "Bearer sekret"}};
  auto status_of = [&](const httplib::Result& res) { return res ? res->status : -1; };
  auto error_of = [&](const httplib::Result& res) -> std::string {
    if (!res) return "(no response)";
    const Json j = Json::parse(res->body, nullptr, false);  // every error is JSON
    if (!j.is_object() || !j.contains("error")) {
      ADD_FAILURE() << "status " << res->status << " without a JSON error: " << res->body.substr(0, 200);
      return "(no error)";
    }
    EXPECT_EQ(j["error"].value("status", -1), res->status);
    return j["error"].value("message", std::string("(no message)"));
  };
  auto json = [&](const std::string& body, const httplib::Headers& h = {}) { return c.Post("/v1/captions", h, body, "application/json"); };

  EXPECT_EQ(status_of(c.Get("/health")), 200);  // health needs no key
  auto no_key = json(Json{{"path", wav}}.dump());
  EXPECT_EQ(status_of(no_key), 401);
  EXPECT_NE(error_of(no_key).find("API key"), std::string::npos);
  EXPECT_EQ(status_of(json(Json{{"path", wav}}.dump(), {{"Authorization", "Bearer wrong"}})), 401);
  EXPECT_EQ(status_of(c.Get("/metrics")), 401);
  c.set_default_headers(auth);

  struct Case {
    std::string body, content_type;
    int status;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"{not json", "application/json", 400, "not valid JSON"},
      {"[1,2]", "application/json", 400, "must be a JSON object"},
      {Json{{"path", wav}, {"beam", 3}}.dump(), "application/json", 400, "unknown key \"beam\""},
      {Json{{"path", wav}, {"beam_size", "five"}}.dump(), "application/json", 400, "wrong type"},
      {Json{{"path", wav}, {"beam_size", 0}}.dump(), "application/json", 400, "beam_size must be"},
      {Json{{"path", wav}, {"max_tokens", 100000}}.dump(), "application/json", 400, "max_tokens must be"},
      {Json{{"path", wav}, {"window", -1}}.dump(), "application/json", 400, "window and hop"},
      {Json{{"path", wav}, {"hop", 1}}.dump(), "application/json", 400, "hop needs a window"},
      {Json{{"path", wav}, {"top_p", 2.0}, {"sample", true}}.dump(), "application/json", 400, "top_p"},
      {Json{{"media", "abc$"}}.dump(), "application/json", 400, "not valid base64"},
      {Json{{"media", 5}}.dump(), "application/json", 400, "base64 string"},
      {Json{{"media", base64("xyz")}, {"path", wav}}.dump(), "application/json", 400, "give one of"},
      {Json::object().dump(), "application/json", 400, "give one of"},
      {Json{{"path", "/etc/passwd"}}.dump(), "application/json", 403, "outside the roots"},
      {Json{{"path", dir.file("nope.wav")}}.dump(), "application/json", 404, "no such file"},
      {Json{{"path", dir.path()}}.dump(), "application/json", 400, "not a regular file"},
      {Json{{"path", long_wav}}.dump(), "application/json", 413, "the limit is"},
      {Json{{"media", base64("this is no audio at all")}, {"filename", "n.wav"}}.dump(), "application/json", 422, "n.wav"},
      {"hello", "text/plain", 415, "multipart/form-data"},
      {Json{{"path", wav}, {"window", 0.25}}.dump(), "application/json", 413, "queue holds 6"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.body.substr(0, 80));
    auto res = c.Post("/v1/captions", k.body, k.content_type.c_str());
    EXPECT_EQ(status_of(res), k.status) << (res ? res->body : "");
    EXPECT_NE(error_of(res).find(k.message), std::string::npos) << error_of(res);
  }
  // Multipart: no file field, an unknown field, a bad value, an image for an audio captioner.
  auto no_file = c.Post("/v1/captions", httplib::MultipartFormDataItems{{"beam_size", "2", "", ""}});
  EXPECT_EQ(status_of(no_file), 400);
  EXPECT_NE(error_of(no_file).find("without a \"file\""), std::string::npos);
  EXPECT_EQ(status_of(c.Post("/v1/captions", upload(read_bytes(wav), "a.wav", {{"colour", "red"}}))), 400);
  EXPECT_EQ(status_of(c.Post("/v1/captions", upload(read_bytes(wav), "a.wav", {{"beam_size", "many"}}))), 400);
  EXPECT_EQ(status_of(c.Post("/v1/captions", upload("", "a.wav"))), 400);
  auto image = c.Post("/v1/captions", upload(read_bytes(fixture_dir("clip-vit-tiny") + "/astronaut.png"), "a.png"));
  EXPECT_EQ(status_of(image), 415);
  EXPECT_NE(error_of(image).find("a.png is an image"), std::string::npos);
  // Too large a body: 413 from the HTTP layer, still JSON.
  auto big = c.Post("/v1/captions", upload(std::string(2 << 20, 'x'), "big.wav"));
  EXPECT_EQ(status_of(big), 413);
  EXPECT_NE(error_of(big).find("--max-body-mb"), std::string::npos);
  // Unknown routes and methods.
  EXPECT_EQ(status_of(c.Get("/v2/anything")), 404);
  EXPECT_EQ(status_of(c.Delete("/v1/captions")), 404);

  // A full queue: 429 with Retry-After while a request holds the queue (6 windows, captioned
  // one per batch). The second request has 6 windows too, so it fits only once the queue is
  // empty: it is refused while any of the holder's windows still waits, not only the last five.
  std::thread holder([&] {
    httplib::Client h("127.0.0.1", server.port());
    h.set_default_headers(auth);
    h.set_read_timeout(120, 0);
    auto res = h.Post("/v1/captions", Json{{"path", wav}, {"window", 0.5}, {"beam_size", 8}}.dump(), "application/json");
    EXPECT_EQ(status_of(res), 200);
  });
  wait_for_queue(c, [](int depth) { return depth >= 4; });  // the holder's windows wait in the queue
  auto full = json(Json{{"path", wav}, {"window", 0.5}}.dump(), auth);
  const int full_status = status_of(full);
  const std::string retry_after = full ? full->get_header_value("Retry-After") : "";
  const std::string full_message = error_of(full);
  holder.join();
  ASSERT_EQ(full_status, 429);
  EXPECT_FALSE(retry_after.empty());
  EXPECT_NE(full_message.find("queue is full"), std::string::npos);

  // After all that: still serving, and the metrics counted the errors.
  EXPECT_EQ(status_of(json(Json{{"path", wav}}.dump(), auth)), 200);
  const std::string metrics = c.Get("/metrics")->body;
  EXPECT_NE(metrics.find("route=\"/v1/captions\",status=\"400\""), std::string::npos);
  EXPECT_NE(metrics.find("route=\"/v1/captions\",status=\"413\""), std::string::npos);
  EXPECT_EQ(server.process().wait(0), -1) << server.stderr_text();  // not crashed
}

TEST_F(CaptionServer, SigtermFinishesTheRequestsInFlight) {
  TempDir dir;
  const std::string wav = wav_bytes(dir, "w.wav", 30, 7);
  Server server(aac_bundle(), {"--allow-path", dir.path(), "--max-batch", "2"});
  std::promise<int> status;
  std::thread client([&] {
    auto c = server.client();
    auto res = c.Post("/v1/captions", Json{{"path", wav}, {"window", 1}}.dump(), "application/json");
    status.set_value(res ? res->status : -1);
  });
  auto c = server.client();
  wait_for_queue(c, [](int depth) { return depth > 0; });
  server.process().signal(SIGTERM);
  client.join();
  EXPECT_EQ(status.get_future().get(), 200);  // the request in flight was finished
  EXPECT_EQ(server.process().wait(60), 0) << server.stderr_text();
  EXPECT_NE(server.stderr_text().find("finishing the requests in flight"), std::string::npos);
  httplib::Client late("127.0.0.1", server.port());
  late.set_connection_timeout(1, 0);
  EXPECT_FALSE(late.Get("/health"));  // nobody listens any more
}

TEST_F(CaptionServer, ConnectionsBeyondTheLimitGet503) {
  Server server(aac_bundle(), {"--max-connections", "1", "--read-timeout", "5"});
  // Two connections that send half a request: one holds the only worker, one waits for it.
  auto half_open = [&] {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server.port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const std::string partial = "GET /health HTTP/1.1\r\nHost: x\r\n";
    EXPECT_EQ(send(fd, partial.data(), partial.size(), 0), static_cast<ssize_t>(partial.size()));
    return fd;
  };
  const int a = half_open();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const int b = half_open();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto c = server.client();
  auto res = c.Get("/health");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_NE(res->body.find("too many connections"), std::string::npos);
  EXPECT_FALSE(res->get_header_value("Retry-After").empty());
  close(a);
  close(b);
  // Once they are gone, the server answers again.
  int status = -1;
  for (int i = 0; i < 100 && status != 200; ++i) {
    auto again = server.client().Get("/health");
    status = again ? again->status : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(status, 200);
}

TEST_F(CaptionServer, ARequestPastItsTimeoutGets504AndLeavesTheQueue) {
  TempDir dir;
  const std::string wav = wav_bytes(dir, "t.wav", 20, 8);
  Server server(aac_bundle(), {"--allow-path", dir.path(), "--timeout", "0.05", "--max-batch", "1"});
  auto c = server.client();
  Json err = post_json(c, {{"path", wav}, {"window", 0.5}, {"beam_size", 4}}, 504);  // 40 windows, one per batch
  EXPECT_NE(err["error"]["message"].get<std::string>().find("--timeout"), std::string::npos);
  // Its windows were withdrawn: the queue empties at once instead of captioning 40 windows.
  EXPECT_EQ(wait_for_queue(c, [](int depth) { return depth == 0; }), 0);
  const std::string metrics = c.Get("/metrics")->body;
  EXPECT_LT(metric(metrics, "prefixcap_batch_size_sum"), 10) << metrics;
}
