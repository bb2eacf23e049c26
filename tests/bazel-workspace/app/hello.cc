#include <iostream>

#include "lib/greet.h"

int main(int argc, char** argv) {
  const std::string name = argc > 1 ? argv[1] : "Outpost";
  std::cout << greet::Greeting(name) << "\n" << greet::Shout(name) << "\n";
  return 0;
}
