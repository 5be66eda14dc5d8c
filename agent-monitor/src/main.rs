//! The agent-monitor daemon; everything lives in the library (see `cli::main`).

fn main() -> std::process::ExitCode {
    agent_monitor::cli::main()
}
