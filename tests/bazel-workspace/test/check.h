#ifndef OUTPOST_EXAMPLE_TEST_CHECK_H_
#define OUTPOST_EXAMPLE_TEST_CHECK_H_

#include <iostream>

// Minimal assertion helper so the tests need no external framework.
static int g_failures = 0;

#define CHECK_EQ(a, b)                                                  \
  do {                                                                  \
    const auto va = (a);                                                \
    const auto vb = (b);                                                \
    if (!(va == vb)) {                                                  \
      std::cout << __FILE__ << ":" << __LINE__ << ": CHECK_EQ(" #a ", " #b \
                << ") failed: " << va << " != " << vb << "\n";          \
      ++g_failures;                                                     \
    }                                                                   \
  } while (0)

#define TEST_RESULT() (g_failures == 0 ? (std::cout << "PASS\n", 0) : 1)

#endif  // OUTPOST_EXAMPLE_TEST_CHECK_H_
