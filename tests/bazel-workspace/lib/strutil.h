#ifndef OUTPOST_EXAMPLE_LIB_STRUTIL_H_
#define OUTPOST_EXAMPLE_LIB_STRUTIL_H_

#include <string>

namespace strutil {

// Returns s with ASCII letters upper-cased.
std::string Upper(const std::string& s);

// Returns s repeated n times, separated by sep.
std::string Repeat(const std::string& s, int n, const std::string& sep);

}  // namespace strutil

#endif  // OUTPOST_EXAMPLE_LIB_STRUTIL_H_
