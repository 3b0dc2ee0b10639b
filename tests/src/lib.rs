//! Helpers for integration tests that run sinew nodes as real processes on loopback.
//!
//! [`sinew_bin`] builds (once per test binary) and locates the `sinew` executable of the same
//! profile; [`Node`] is a child process that is killed when dropped, so a failing test never
//! leaves a server behind.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

/// The `sinew` binary, built from the current sources with the same profile as the tests.
pub fn sinew_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile directory");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "sinew", "--bin", "sinew"]);
        if release {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("running cargo build for the sinew binary");
        assert!(status.success(), "cargo build -p sinew failed");
        let bin = profile_dir.join("sinew");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// A `sinew` command with a clean environment for keys and logs.
pub fn sinew() -> Command {
    let mut c = Command::new(sinew_bin());
    c.env_remove("SINEW_CLUSTER_KEY").env_remove("SINEW_LOG");
    c
}

/// Writes a hex cluster key file with mode 0600 in `dir`.
pub fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .expect("creating a key file");
    std::io::Write::write_all(
        &mut f,
        format!("{}\n", format!("{byte:02x}").repeat(32)).as_bytes(),
    )
    .expect("writing a key file");
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// A running sinew process, killed on drop.
pub struct Node {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Node {
    /// Spawns `cmd` with piped stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Node {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning sinew");
        let stdout = child.stdout.take().map(BufReader::new);
        Node { child, stdout }
    }

    /// Waits (up to `timeout`) for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let mut stdout = self.stdout.take().expect("stdout already consumed");
        let (tx, rx) = mpsc::channel();
        let prefix_owned = prefix.to_string();
        std::thread::spawn(move || {
            let mut line = String::new();
            loop {
                line.clear();
                match stdout.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(_) => {
                        if let Some(rest) = line.trim_end().strip_prefix(&prefix_owned) {
                            let _ = tx.send(Some(rest.to_string()));
                            // Keep draining so the child never blocks on a full pipe.
                            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
                            return;
                        }
                    }
                }
            }
        });
        match rx.recv_timeout(timeout) {
            Ok(Some(rest)) => rest,
            Ok(None) => panic!("process exited before printing {prefix:?}"),
            Err(_) => panic!("no line starting with {prefix:?} within {timeout:?}"),
        }
    }

    /// Starts `sinew link server` on an ephemeral loopback port; returns it and its address.
    pub fn link_server(key: &Path) -> (Node, String) {
        let mut cmd = sinew();
        cmd.args([
            "link",
            "server",
            "--bind",
            "127.0.0.1:0",
            "--cluster-key-file",
        ])
        .arg(key);
        let mut node = Node::spawn(cmd);
        let addr = node.wait_for_line("listening on ", Duration::from_secs(30));
        (node, addr)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and returns what it wrote to stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion, killing it after `timeout` (a hang is a test failure, not a stuck
/// CI job). Returns its output, or `None` when it had to be killed.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sinew");
    let id = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Some(out.expect("collecting output")),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
            None
        }
    }
}
