#include <cstdlib>
#include <iostream>

#include "lib/mathx.h"

int main(int argc, char** argv) {
  const unsigned n = argc > 1 ? static_cast<unsigned>(std::atoi(argv[1])) : 20;
  std::cout << "fib(" << n << ") = " << mathx::Fib(n) << "\n";
  std::cout << "gcd(84, 36) = " << mathx::Gcd(84, 36) << "\n";
  std::cout << n << (mathx::IsPrime(n) ? " is" : " is not") << " prime\n";
  return 0;
}
