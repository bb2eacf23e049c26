#ifndef OUTPOST_EXAMPLE_LIB_GREET_H_
#define OUTPOST_EXAMPLE_LIB_GREET_H_

#include <string>

namespace greet {

// Returns "Hello, <name>!".
std::string Greeting(const std::string& name);

// Returns the greeting shouted (upper case).
std::string Shout(const std::string& name);

}  // namespace greet

#endif  // OUTPOST_EXAMPLE_LIB_GREET_H_
