// CPU emulator stand-in (see ../../emulator.h): the launch checks live in the launchers, which the
// emulator does not compile.
#pragma once
