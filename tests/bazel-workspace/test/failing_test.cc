#include <iostream>

// This test fails on purpose; end-to-end tests look for the marker line in
// the test log to check that failing test results and logs are reported.
int main() {
  std::cout << "OUTPOST_EXPECTED_FAILURE: this test fails on purpose" << std::endl;
  return 1;
}
