fn main() {
    std::process::exit(stagesync::cli::main());
}
