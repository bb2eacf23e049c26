#include <cstdint>

#include "lib/mathx.h"
#include "test/check.h"

int main() {
  CHECK_EQ(mathx::Fib(0), std::uint64_t{0});
  CHECK_EQ(mathx::Fib(1), std::uint64_t{1});
  CHECK_EQ(mathx::Fib(20), std::uint64_t{6765});
  CHECK_EQ(mathx::Fib(90), std::uint64_t{2880067194370816120ULL});
  CHECK_EQ(mathx::Gcd(84, 36), std::uint64_t{12});
  CHECK_EQ(mathx::Gcd(17, 5), std::uint64_t{1});
  CHECK_EQ(mathx::IsPrime(2), true);
  CHECK_EQ(mathx::IsPrime(91), false);
  CHECK_EQ(mathx::IsPrime(7919), true);
  return TEST_RESULT();
}
