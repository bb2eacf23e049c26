#include "lib/greet.h"

#include "lib/strutil.h"

namespace greet {

std::string Greeting(const std::string& name) {
  return "Hello, " + name + "!";
}

std::string Shout(const std::string& name) {
  return strutil::Upper(Greeting(name));
}

}  // namespace greet
