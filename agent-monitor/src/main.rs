//! The agent-monitor daemon; everything lives in the library (see `cli::main`).

/// Records are allocated on the lane consumer's thread and freed on the output thread;
/// mimalloc's per-thread free lists take that far better than glibc's arenas (`cargo xtask
/// bench pipeline`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    agent_monitor::cli::main()
}
