// mimalloc instead of the system allocator: planning a batch builds and drops many small
// documents, and glibc's malloc and free were about 30 % of stagesync's CPU in the backlog
// catch-up. With mimalloc stagesync spends about a fifth less CPU per change, CPU the staging
// server gets on a shared machine (docs/BENCHMARKS.md, note 11). Built without transparent
// huge pages (`no_thp`): with them, every touched 2 MiB page counted whole and peak RSS rose
// from about 80 to 115-124 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(stagesync::cli::main());
}
