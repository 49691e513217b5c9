#include "core/log.h"

#include <cstdio>
#include <mutex>
#include <set>

namespace prefixcap {

void log_warning(const std::string& message) {
  static std::mutex mutex;
  static std::set<std::string> printed;
  std::lock_guard<std::mutex> lock(mutex);
  if (!printed.insert(message).second) return;
  std::fprintf(stderr, "prefixcap: warning: %s\n", message.c_str());
  std::fflush(stderr);
}

}  // namespace prefixcap
