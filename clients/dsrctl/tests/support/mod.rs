//! What the tests that run `dsrctl dev up` share: starting it, waiting until both services
//! listen, and stopping it when the test ends.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// How long dev up may take to say both services listen: a guard against a hang, not a
/// measure (a first start creates the PKI and the sample database).
const READY_GUARD: Duration = Duration::from_secs(120);

/// The last line dev up prints once both services listen.
const READY_LINE: &str = "Stop with Ctrl-C.";

/// A `dsrctl dev up` this test started, killed when dropped (a failed assertion included).
pub(crate) struct DevUp(Child);

impl Drop for DevUp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free when asked; dev up binds it a moment later.
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// Output as text, for messages and assertions.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Removes every `DSRCTL_*` variable from `cmd`'s environment: the test's own settings
/// decide, not the shell's that runs it.
pub(crate) fn clear_settings(cmd: &mut Command) {
    for (name, _) in std::env::vars() {
        if name.starts_with("DSRCTL_") {
            cmd.env_remove(name);
        }
    }
}

/// Runs `cmd` as if dsrctl were installed: PATH finds this binary by its name first, so the
/// commands it suggests start with `dsrctl`, as they do for a user who installed it.
#[allow(dead_code)] // Not every test binary that includes this module suggests commands.
pub(crate) fn as_installed(cmd: &mut Command) {
    let exe = Path::new(env!("CARGO_BIN_EXE_dsrctl"));
    let folder = exe.parent().expect("the binary's folder").to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(folder).chain(std::env::split_paths(&path)))
        .expect("PATH");
    cmd.env("PATH", path);
}

/// Starts `dsrctl dev up` with `args` in `cwd` and returns what it printed up to its last
/// line, once both services listen.
pub(crate) fn dev_up(cwd: &Path, args: &[&str]) -> (DevUp, Vec<String>) {
    dev_up_with(cwd, args, &[])
}

/// [`dev_up`] with the environment variables `env` set.
pub(crate) fn dev_up_with(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (DevUp, Vec<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dsrctl"));
    cmd.current_dir(cwd)
        .args(["dev", "up"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    clear_settings(&mut cmd);
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("starting dsrctl dev up");
    let stderr = child.stderr.take().expect("stderr");
    let guard = DevUp(child);
    // Read on a thread, so that a dev up that hangs fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + READY_GUARD;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line.expect("reading dev up's output"),
            Err(RecvTimeoutError::Timeout) => panic!(
                "dev up was not ready within {READY_GUARD:?} (a hang guard):\n{}",
                lines.join("\n")
            ),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let last = line == READY_LINE;
        lines.push(line);
        if last {
            return (guard, lines);
        }
    }
    panic!("dev up ended before it was ready:\n{}", lines.join("\n"));
}
