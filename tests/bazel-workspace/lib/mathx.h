#ifndef OUTPOST_EXAMPLE_LIB_MATHX_H_
#define OUTPOST_EXAMPLE_LIB_MATHX_H_

#include <cstdint>

namespace mathx {

// n-th Fibonacci number (fib(0) == 0, fib(1) == 1).
std::uint64_t Fib(unsigned n);

// Greatest common divisor.
std::uint64_t Gcd(std::uint64_t a, std::uint64_t b);

// True if n is prime.
bool IsPrime(std::uint64_t n);

}  // namespace mathx

#endif  // OUTPOST_EXAMPLE_LIB_MATHX_H_
