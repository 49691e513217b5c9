// Helpers shared by the libFuzzer targets: the input as a file (the readers take paths), and
// the rule that only the library's documented error types may escape. Anything else (a raw
// c10::Error, an nlohmann exception, a crash) is a finding.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace prefixcap::fuzz {

// The bytes as a regular file: a memfd reused across runs, named by its /proc/self/fd path.
inline std::string as_file(const uint8_t* data, size_t size, int slot = 0) {
  static int fds[2] = {-1, -1};
  int& fd = fds[slot];
  if (fd < 0) fd = memfd_create(slot == 0 ? "prefixcap-fuzz-0" : "prefixcap-fuzz-1", 0);
  if (fd < 0 || ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    const ssize_t n = pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  return "/proc/self/fd/" + std::to_string(fd);
}

}  // namespace prefixcap::fuzz
