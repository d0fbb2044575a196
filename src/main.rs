fn main() -> std::process::ExitCode {
    pdctl::cli::main()
}
