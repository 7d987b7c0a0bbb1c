#include "fusefs/daemon.h"

int main(int argc, char** argv) { return vmetafs::fusefs::RunDaemon(argc, argv); }
