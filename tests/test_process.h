// A child process for the tests of long-running tools (caption --stream, caption-server):
// stdin through a pipe, stdout and stderr into files, its memory read from /proc.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace prefixcap::testing {

class Child {
 public:
  Child(const std::vector<std::string>& argv, const std::string& stdout_path, const std::string& stderr_path,
        bool pipe_stdin = false) {
    int fds[2] = {-1, -1};
    if (pipe_stdin && pipe(fds) != 0) throw std::runtime_error("pipe failed");
    pid_ = fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      if (pipe_stdin) {
        dup2(fds[0], 0);
        close(fds[0]);
        close(fds[1]);
      } else {
        int null = open("/dev/null", O_RDONLY);
        dup2(null, 0);
      }
      int out = open(stdout_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      int err = open(stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(out, 1);
      dup2(err, 2);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    if (pipe_stdin) {
      close(fds[0]);
      stdin_ = fds[1];
    }
  }
  ~Child() {
    close_stdin();
    if (pid_ > 0 && status_ < 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  // Writes everything to the child's stdin; false when the child closed it.
  bool write_stdin(const void* data, size_t size) {
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
      ssize_t n = ::write(stdin_, p, size);
      if (n <= 0) return false;
      p += n;
      size -= static_cast<size_t>(n);
    }
    return true;
  }
  void close_stdin() {
    if (stdin_ >= 0) close(stdin_);
    stdin_ = -1;
  }
  void signal(int sig) { kill(pid_, sig); }
  // Exit code, 128 + signal when killed by one, or -1 when still running after `seconds`.
  int wait(double seconds = 600) {
    if (status_ >= 0) return status_;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (true) {
      int st = 0;
      pid_t r = waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        return status_;
      }
      if (std::chrono::steady_clock::now() > deadline) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  // A line of /proc/PID/status in KiB (VmRSS, VmHWM), or -1.
  long status_kib(const std::string& key) const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
    return -1;
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1;
  int status_ = -1;
};

// The port a caption-server child printed ("listening on http://127.0.0.1:PORT") into its stdout
// file, waiting up to `seconds`; 0 when it exited or never said.
inline int listening_port(Child& server, const std::string& stdout_path, double seconds = 60) {
  const std::regex listening("listening on http://127\\.0\\.0\\.1:([0-9]+)");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(stdout_path);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::smatch m;
    if (std::regex_search(text, m, listening)) return std::stoi(m[1]);
    if (server.wait(0.05) >= 0) return 0;
  }
  return 0;
}

}  // namespace prefixcap::testing
