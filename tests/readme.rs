//! The README's library example compiles and runs (on the CPU backend where there is no GPU:
//! `Device::open` falls back to it), and the README shows exactly this code.

/// Defines `library_example` running `$code`, and `EXAMPLE`, its tokens as text.
macro_rules! example {
    ($($code:tt)*) => {
        fn library_example() -> Result<(), multiq::Error> {
            $($code)*
            Ok(())
        }
        const EXAMPLE: &str = stringify!($($code)*);
    };
}

example! {
    use multiq::{Device, DeviceOptions, Inflight, Kernel, LockMode, PoolConfig, StreamPool};

    let device = Device::open(&DeviceOptions::default())?;          // CUDA if present, else CPU
    let pool = StreamPool::new(&device, PoolConfig { streams: 32, lock: LockMode::PerStream, ..Default::default() })?;
    // in any thread:
    let stream = pool.current()?;                                   // round-robin once, then sticky
    let mut buf = device.buffer_from(&vec![0.5f32; 1 << 16])?;
    stream.launch(Kernel::SimpleCompute { iters: 10 }, &mut buf)?.wait()?;
    let mut window = Inflight::new(8)?;                             // or: 8 ops in flight
    window.submit(|| stream.launch(Kernel::SimpleCompute { iters: 10 }, &mut buf))?;
    window.drain()?;
}

/// Code without its comments and whitespace: what two spellings of the same tokens share.
fn tokens(code: &str) -> String {
    code.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

#[test]
fn the_readme_library_example_runs() {
    library_example().unwrap();
}

#[test]
fn the_readme_shows_the_example_that_runs() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("## The library\n\n```rust\n")
        .expect("the README's library section")
        + "## The library\n\n```rust\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    assert_eq!(tokens(block), tokens(EXAMPLE), "README:\n{block}");
}
