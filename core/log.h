// One-line warnings on stderr for things a user should know but that do not stop the work
// (a config accepted with librosa's semantics, a fallback taken). Each distinct message is
// printed once per process.
#pragma once

#include <string>

namespace prefixcap {

void log_warning(const std::string& message);

}  // namespace prefixcap
