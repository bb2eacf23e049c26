#include <string>

#include "lib/greet.h"
#include "test/check.h"

int main() {
  CHECK_EQ(greet::Greeting("Bazel"), std::string("Hello, Bazel!"));
  CHECK_EQ(greet::Shout("Bazel"), std::string("HELLO, BAZEL!"));
  CHECK_EQ(greet::Greeting(""), std::string("Hello, !"));
  return TEST_RESULT();
}
