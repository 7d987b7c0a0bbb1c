// meta-restore: the offline tool over a vmetafs store (see `meta-restore --help`).
#include "tools/meta_restore/commands.h"

int main(int argc, char** argv) { return vmetafs::meta_restore::Main(argc, argv); }
