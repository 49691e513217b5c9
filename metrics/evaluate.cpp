#include "metrics/evaluate.h"

#include <sys/wait.h>
#include <pthread.h>
#include <csignal>
#include <cerrno>
#include <ctime>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <exception>
#include <functional>
#include <vector>

#include <nlohmann/json.hpp>

namespace prefixcap {
namespace fs = std::filesystem;

namespace {

// Runs argv with pipes to its stdin and stdout.
struct Child {
  pid_t pid = -1;
  FILE* to = nullptr;
  FILE* from = nullptr;
  explicit Child(const std::vector<std::string>& argv) {
    int in_pipe[2], out_pipe[2];
    if (pipe(in_pipe) != 0 || pipe(out_pipe) != 0) throw std::runtime_error("cannot create pipes");
    pid = fork();
    if (pid < 0) throw std::runtime_error("cannot fork");
    if (pid == 0) {
      dup2(in_pipe[0], 0);
      dup2(out_pipe[1], 1);
      close(in_pipe[1]);
      close(out_pipe[0]);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    close(in_pipe[0]);
    close(out_pipe[1]);
    to = fdopen(in_pipe[1], "w");
    from = fdopen(out_pipe[0], "r");
  }
  // Writes all of `text` to the child's stdin. A child that has exited gives an error here, not
  // a SIGPIPE that would kill the whole program: the signal is blocked in this thread for the
  // write and a pending one is consumed.
  void write_all(const std::string& text) {
    sigset_t pipe_only, old;
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_only, &old);
    const int fd = fileno(to);
    size_t done = 0;
    bool broken = false;
    while (done < text.size()) {
      const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        broken = true;
        break;
      }
      done += static_cast<size_t>(n);
    }
    if (broken) {
      const timespec zero{0, 0};
      sigtimedwait(&pipe_only, nullptr, &zero);  // the SIGPIPE the failed write raised
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (broken) throw std::runtime_error("the process ended early (it stopped reading its input)");
  }
  std::string read_line() {
    std::string line;
    int c;
    while ((c = std::fgetc(from)) != EOF && c != '\n') line.push_back(static_cast<char>(c));
    if (c == EOF && line.empty()) throw std::runtime_error("the process ended early");
    return line;
  }
  int finish() {
    if (to) std::fclose(to);
    if (from) std::fclose(from);
    to = from = nullptr;
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  ~Child() {
    if (to || from) finish();
  }
};

// Runs fn(begin, end) over [0, n) cut into at most `threads` contiguous spans, the first on the
// calling thread; rethrows the first exception once every span has finished.
void parallel_spans(size_t n, size_t threads, const std::function<void(size_t, size_t)>& fn) {
  const size_t parts = std::max<size_t>(1, std::min(threads, n));
  if (parts == 1) {
    if (n > 0) fn(0, n);
    return;
  }
  std::vector<std::exception_ptr> errors(parts);
  std::vector<std::thread> workers;
  auto run = [&](size_t p) {
    try {
      fn(n * p / parts, n * (p + 1) / parts);
    } catch (...) {
      errors[p] = std::current_exception();
    }
  };
  for (size_t p = 1; p < parts; ++p) workers.emplace_back(run, p);
  run(0);
  for (auto& w : workers) w.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

std::string run_capture(const std::string& command) {
  std::string out;
  FILE* p = popen(command.c_str(), "r");
  if (!p) return out;
  char buf[256];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  pclose(p);
  return out;
}

std::string one_line(std::string s) {
  for (auto& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

// Python's str.replace(old, new): every non-overlapping occurrence, left to right.
std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

}  // namespace

std::vector<std::string> coco_tokenize_with_jar(const std::vector<std::string>& captions, const std::string& jar,
                                                const std::string& java) {
  if (!fs::exists(jar)) throw std::runtime_error("the PTB tokenizer jar " + jar + " does not exist");
  // The input goes through a file, as pycocoevalcap passes it.
  std::string tmpl = (fs::temp_directory_path() / "prefixcap-ptb-XXXXXX").string();
  const int fd = mkstemp(tmpl.data());
  if (fd < 0) throw std::runtime_error("cannot create a temporary file for the PTB tokenizer");
  close(fd);
  struct Remove {
    std::string path;
    ~Remove() { std::remove(path.c_str()); }
  } remove{tmpl};
  {
    std::ofstream out(tmpl, std::ios::binary);
    for (size_t i = 0; i < captions.size(); ++i) out << (i ? "\n" : "") << one_line(captions[i]);
    if (!out) throw std::runtime_error("cannot write the PTB tokenizer's input");
  }
  Child tokenizer({java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", tmpl});
  std::vector<std::string> out;
  for (size_t i = 0; i < captions.size(); ++i) {
    std::string line;
    try {
      line = tokenizer.read_line();
    } catch (const std::runtime_error&) {
      break;  // fewer lines than captions (trailing empty captions): the rest are empty
    }
    out.push_back(coco_tokenize_ptb_line(line));
  }
  out.resize(captions.size());
  if (const int status = tokenizer.finish(); status != 0)
    throw std::runtime_error("the PTB tokenizer (" + java + " -cp " + jar + ") exited with status " + std::to_string(status));
  return out;
}

namespace {

// pycocoevalcap meteor.py's protocol with `java -jar meteor-1.5.jar - - -stdio -l en -norm`.
void run_meteor(const std::vector<CaptionItem>& items, const EvalOptions& o, EvalReport& r) {
  Child meteor({o.java, "-jar", "-Xmx2G", o.meteor_jar, "-", "-", "-stdio", "-l", "en", "-norm"});
  std::string eval = "EVAL";
  for (const auto& it : items) {
    std::string line = "SCORE";
    for (const auto& ref : it.references) line += " ||| " + one_line(ref);
    // meteor.py's _stat: hypothesis_str.replace('|||', '').replace('  ', ' '); references as they are
    line += " ||| " + one_line(replace_all(replace_all(it.candidate, "|||", ""), "  ", " ")) + "\n";
    meteor.write_all(line);
    eval += " ||| " + meteor.read_line();
  }
  eval += "\n";
  meteor.write_all(eval);
  std::vector<double> scores;
  for (size_t i = 0; i < items.size(); ++i) scores.push_back(std::stod(meteor.read_line()));
  r.corpus["METEOR"] = std::stod(meteor.read_line());
  r.per_item["METEOR"] = scores;
  meteor.finish();
}

// SPICE: java -jar spice-1.0.jar IN.json -out OUT.json -subset -silent
void run_spice(const std::vector<CaptionItem>& items, const EvalOptions& o, EvalReport& r) {
  const fs::path dir = fs::temp_directory_path() / ("prefixcap-spice-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  nlohmann::json input = nlohmann::json::array();
  for (size_t i = 0; i < items.size(); ++i)
    input.push_back({{"image_id", std::to_string(i)}, {"test", items[i].candidate}, {"refs", items[i].references}});
  std::ofstream((dir / "in.json").string()) << input.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  Child spice({o.java, "-jar", "-Xmx8G", o.spice_jar, (dir / "in.json").string(), "-cache", (dir / "cache").string(), "-out",
               (dir / "out.json").string(), "-subset", "-silent"});
  int rc = spice.finish();
  if (rc != 0 || !fs::exists(dir / "out.json")) {
    fs::remove_all(dir);
    throw std::runtime_error("spice exited with code " + std::to_string(rc));
  }
  nlohmann::json out;
  std::ifstream(dir / "out.json") >> out;
  fs::remove_all(dir);
  std::vector<double> scores(items.size(), 0.0);
  std::vector<bool> seen(items.size(), false);
  double total = 0;
  for (const auto& e : out) {
    size_t i = std::stoul(e.at("image_id").get<std::string>());
    scores.at(i) = e.at("scores").at("All").at("f").get<double>();
    seen.at(i) = true;
    total += scores[i];
  }
  // An item SPICE did not score is a failed run, not a score of 0.
  for (size_t i = 0; i < items.size(); ++i)
    if (!seen[i]) throw std::runtime_error("SPICE gave no score for item '" + items[i].id + "'");
  r.per_item["SPICE"] = scores;
  r.corpus["SPICE"] = items.empty() ? 0.0 : total / items.size();
}

}  // namespace

std::string java_version(const std::string& java) {
  std::string out = run_capture("'" + java + "' -version 2>&1");
  std::smatch m;
  if (std::regex_search(out, m, std::regex("version \"([^\"]+)\""))) return m[1];
  return "";
}

EvalReport evaluate(const std::vector<CaptionItem>& raw, const EvalOptions& o) {
  if (o.threads < 0) throw std::invalid_argument("evaluate: threads must be 0 (every core) or more, got " + std::to_string(o.threads));
  const size_t threads = o.threads > 0 ? static_cast<size_t>(o.threads) : std::max(1u, std::thread::hardware_concurrency());
  EvalReport r;
  std::vector<CaptionItem> items = raw;
  if (o.tokenize && !o.ptb_jar.empty()) {
    std::vector<std::string> all;
    for (const auto& it : items) {
      all.insert(all.end(), it.references.begin(), it.references.end());
      all.push_back(it.candidate);
    }
    const std::vector<std::string> tokenized = coco_tokenize_with_jar(all, o.ptb_jar, o.java);
    size_t k = 0;
    for (auto& it : items) {
      for (auto& ref : it.references) ref = tokenized[k++];
      it.candidate = tokenized[k++];
    }
  } else if (o.tokenize) {
    // Items in contiguous spans, one per thread (each item is tokenized on its own).
    parallel_spans(items.size(), threads, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        items[i].candidate = coco_tokenize(items[i].candidate);
        for (auto& ref : items[i].references) ref = coco_tokenize(ref);
      }
    });
  }
  for (const auto& it : items) r.ids.push_back(it.id);
  // The three native metrics are independent: each on a thread of its own when there are threads.
  std::vector<MetricResult> parts(3);
  const std::vector<std::function<MetricResult()>> metrics = {[&] { return bleu(items); }, [&] { return rouge_l(items); },
                                                              [&] { return cider_d(items); }};
  parallel_spans(metrics.size(), threads, [&](size_t begin, size_t end) {
    for (size_t m = begin; m < end; ++m) parts[m] = metrics[m]();
  });
  for (const auto& part : parts) {
    r.corpus.insert(part.corpus.begin(), part.corpus.end());
    r.per_item.insert(part.per_item.begin(), part.per_item.end());
  }
  const std::string version = (o.meteor_jar.empty() && o.spice_jar.empty()) ? "" : java_version(o.java);
  auto jar_problem = [&](const std::string& jar, const char* flag) -> std::string {
    if (jar.empty()) return std::string("not run: no jar given (") + flag + ")";
    if (!fs::exists(jar)) return "not run: " + jar + " does not exist";
    if (version.empty()) return "not run: Java ('" + o.java + "') cannot be run";
    return "";
  };
  if (std::string why = jar_problem(o.meteor_jar, "--meteor-jar or $PREFIXCAP_METEOR_JAR"); !why.empty()) {
    r.missing["METEOR"] = why;
  } else {
    try {
      run_meteor(items, o, r);
    } catch (const std::exception& e) {
      r.missing["METEOR"] = std::string("failed: ") + e.what();
    }
  }
  if (std::string why = jar_problem(o.spice_jar, "--spice-jar or $PREFIXCAP_SPICE_JAR"); !why.empty()) {
    r.missing["SPICE"] = why;
  } else {
    if (!(version.rfind("1.8", 0) == 0 || version.rfind("11", 0) == 0))
      r.warnings.push_back("SPICE wants Java 8 or 11; found Java " + version + " (it may fail)");
    try {
      run_spice(items, o, r);
    } catch (const std::exception& e) {
      r.missing["SPICE"] = std::string("failed: ") + e.what();
    }
  }
  if (r.corpus.count("SPICE")) {
    r.corpus["SPIDEr"] = (r.corpus["CIDEr"] + r.corpus["SPICE"]) / 2;
    std::vector<double> s;
    for (size_t i = 0; i < items.size(); ++i) s.push_back((r.per_item["CIDEr"][i] + r.per_item["SPICE"][i]) / 2);
    r.per_item["SPIDEr"] = s;
  } else {
    r.missing["SPIDEr"] = "needs SPICE";
  }
  return r;
}

}  // namespace prefixcap
