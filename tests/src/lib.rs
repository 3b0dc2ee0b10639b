//! Helpers for integration tests that run sinew nodes as real processes on loopback.
//!
//! [`sinew_bin`] builds (once per test binary) and locates the `sinew` executable of the same
//! profile; [`Node`] is a child process that is killed when dropped, so a failing test never
//! leaves a server behind.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    c.env_remove("SINEW_CLUSTER_KEY")
        .env_remove("SINEW_LOG")
        .env_remove("SINEW_RDMA_DEVICE");
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

/// A running sinew process, killed on drop. Its stdout and stderr are collected line by line as
/// they come, so a test can wait for a line without blocking the process on a full pipe.
pub struct Node {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Which output of a [`Node`] to look at.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

fn collect(reader: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
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
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        Node {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (up to `timeout`) for a line of `stream` containing `pattern`; returns the line.
    pub fn wait_for(&mut self, stream: Stream, pattern: &str, timeout: Duration) -> String {
        let lines = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains(pattern))
            {
                return l.clone();
            }
            if Instant::now() >= deadline {
                panic!("no {stream:?} line containing {pattern:?} within {timeout:?}");
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to drain what the process wrote.
                std::thread::sleep(Duration::from_millis(50));
                let found = lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|l| l.contains(pattern));
                if !found {
                    panic!("process exited ({status}) before printing {pattern:?}");
                }
                continue;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let line = self.wait_for(Stream::Stdout, prefix, timeout);
        line.trim_end()
            .strip_prefix(prefix)
            .unwrap_or(&line)
            .to_string()
    }

    /// Starts `sinew link server` on an ephemeral loopback port; returns it and its address.
    pub fn link_server(key: &Path) -> (Node, String) {
        Node::link_server_with(key, &[])
    }

    /// [`Node::link_server`] with extra arguments.
    pub fn link_server_with(key: &Path, extra: &[&str]) -> (Node, String) {
        let mut cmd = sinew();
        cmd.args([
            "link",
            "server",
            "--bind",
            "127.0.0.1:0",
            "--cluster-key-file",
        ])
        .arg(key)
        .args(extra);
        let mut node = Node::spawn(cmd);
        let addr = node.wait_for_line("listening on ", Duration::from_secs(30));
        (node, addr)
    }

    /// Starts `sinew worker` listening on `listen` (`127.0.0.1:0` for any port) with the key in
    /// `key`; returns it and the address it listens on.
    pub fn worker(key: &Path, listen: &str, extra: &[&str]) -> (Node, String) {
        let mut cmd = sinew();
        cmd.args([
            "worker",
            "--threads",
            "1",
            "--listen",
            listen,
            "--cluster-key-file",
        ])
        .arg(key)
        .args(extra);
        let mut node = Node::spawn(cmd);
        let addr = node.wait_for_line("worker listening on ", Duration::from_secs(60));
        (node, addr)
    }

    /// Starts `sinew serve --http 127.0.0.1:0` with `args`; returns it and its base URL
    /// (`http://ADDR/v1`) once it serves.
    pub fn serve(args: &[&str]) -> (Node, String) {
        let mut cmd = sinew();
        cmd.args(["serve", "--threads", "1", "--http", "127.0.0.1:0"])
            .args(args);
        let mut node = Node::spawn(cmd);
        let line = node.wait_for(Stream::Stdout, "sinew serving ", Duration::from_secs(120));
        let url = line
            .split(" at ")
            .nth(1)
            .expect("the serving line names the URL")
            .trim()
            .to_string();
        (node, url)
    }

    /// Whether any line of `stream` so far contains `pattern`.
    pub fn printed(&self, stream: Stream, pattern: &str) -> bool {
        let lines = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(pattern))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and returns what it wrote to stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
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

/// A TCP proxy that forwards to one address until [`Proxy::cut`] makes it drop every byte
/// without closing anything — a cable pulled, as the peers see it.
pub struct Proxy {
    addr: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards each connection to `target`.
    pub fn start(target: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let flag = cut.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::Acquire) {
                                continue; // dropped on the floor
                            }
                            if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Proxy { addr, cut }
    }

    /// The address to connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// From now on, nothing passes in either direction.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Runs `ip`/`tc` arguments; panics with what they said when they fail.
fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair, each end shaped by `tc tbf`; removed on
/// drop.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// The worker side's address.
    pub host: String,
    /// The veth end outside.
    pub outer: String,
    /// The veth end inside.
    pub inner: String,
}

impl Netns {
    /// A namespace `sinew-TAG-PID` joined by a veth pair (10.N.0.2 outside, 10.N.0.1 inside, N
    /// from the tag's first letter) shaped by `tc tbf` at `rate` both ways.
    pub fn new(tag: &str, rate: &str) -> Netns {
        let name = format!("sinew-{tag}-{}", std::process::id());
        let outer = format!("sx{tag}{}", std::process::id() % 10000);
        let inner = format!("sy{tag}{}", std::process::id() % 10000);
        let net = 70 + u32::from(tag.as_bytes()[0].wrapping_sub(b'a') % 50) + 1;
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host: format!("10.{net}.0.1"),
            outer: outer.clone(),
            inner: inner.clone(),
        };
        sh(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &name,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.{net}.0.2/24"),
            "brd",
            "+",
            "dev",
            &outer,
        ]);
        sh(&["ip", "link", "set", &outer, "up"]);
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.{net}.0.1/24"),
            "brd",
            "+",
            "dev",
            &inner,
        ]);
        sh(&["ip", "-n", &name, "link", "set", &inner, "up"]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        ns.shape("add", rate);
        ns
    }

    /// Takes the IPv4 addresses off both ends of the veth pair: the link is left with IPv6
    /// link-local addresses only.
    pub fn ipv6_only(&self) {
        sh(&["ip", "-4", "addr", "flush", "dev", &self.outer]);
        sh(&[
            "ip",
            "-n",
            &self.name,
            "-4",
            "addr",
            "flush",
            "dev",
            &self.inner,
        ]);
    }

    /// Shapes both ends of the veth pair with `tc tbf` at `rate`: `verb` "add" the first time,
    /// "change" after.
    pub fn shape(&self, verb: &str, rate: &str) {
        for (ns_args, dev) in [
            (vec![], self.outer.as_str()),
            (vec!["-n", self.name.as_str()], self.inner.as_str()),
        ] {
            let mut a = vec!["tc"];
            a.extend(ns_args);
            a.extend([
                "qdisc", verb, "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms",
            ]);
            sh(&a);
        }
    }

    /// Starts `sinew worker` inside the namespace on its address (TCP links, one thread) with
    /// the cluster key in `key` and `extra` arguments; returns it and its address once it listens.
    pub fn worker(&self, key: &Path, extra: &[&str]) -> (Node, String) {
        self.worker_at(&format!("{}:0", self.host), key, extra)
    }

    /// [`Netns::worker`] listening on `listen`.
    pub fn worker_at(&self, listen: &str, key: &Path, extra: &[&str]) -> (Node, String) {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(sinew_bin())
            .args(["worker", "--threads", "1", "--transport", "tcp", "--listen"])
            .arg(listen)
            .arg("--cluster-key-file")
            .arg(key)
            .args(extra);
        let mut node = Node::spawn(cmd);
        let addr = node.wait_for_line("worker listening on ", Duration::from_secs(60));
        (node, addr)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Whether this process may make network namespaces (root, iproute2).
pub fn can_make_namespaces() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success())
}
