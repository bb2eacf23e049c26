#include "lib/strutil.h"

#include <cctype>

namespace strutil {

std::string Upper(const std::string& s) {
  std::string out = s;
  for (char& c : out) {
    c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return out;
}

std::string Repeat(const std::string& s, int n, const std::string& sep) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    if (i > 0) out += sep;
    out += s;
  }
  return out;
}

}  // namespace strutil
