//! A real 3-member etcd cluster on 127.0.0.1 for the cluster-mode tests, with its data in
//! a temporary folder, members that can be killed and restarted, and a TCP proxy that
//! stands for a network link that can be cut.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `etcd` binary, or `None` (the caller skips with a message) when it is not installed.
pub fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .chain([
            PathBuf::from("/usr/bin/etcd"),
            PathBuf::from("/usr/sbin/etcd"),
        ])
        .find(|p| p.is_file())
}

/// A port that was free a moment ago, below the kernel's ephemeral range (32768–60999 by
/// default). A port from `bind(0)` is in that range, where every outgoing connection of
/// the tests takes its local port, and one did take it before etcd could bind it.
/// Ports are handed out once per test process, from a start that depends on the pid.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = LOW + (std::process::id() % u32::from(HIGH - LOW)) as u16;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in LOW..HIGH {
        let mut p = NEXT.fetch_add(1, Ordering::SeqCst);
        if !(LOW..HIGH).contains(&p) {
            NEXT.store(LOW + 1, Ordering::SeqCst);
            p = LOW;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in {LOW}..{HIGH}");
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// Three etcd members.
pub struct EtcdCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster has a leader.
    pub fn start(bin: PathBuf) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("etcd tempdir");
        let members = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut c = EtcdCluster { bin, dir, members };
        for i in 0..3 {
            c.start_member(i);
        }
        for i in 0..3 {
            c.wait_healthy(i);
        }
        c
    }

    /// The client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// Client ports.
    pub fn client_ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// Where the members keep their data.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let state = if data.exists() { "existing" } else { "new" };
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log");
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(&self.bin)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "llmd-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` answers `/health` with a leader.
    pub fn wait_healthy(&self, i: usize) {
        let port = self.members[i].client;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if health(port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd member {i} did not become healthy: {}", self.log(i));
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default()
    }

    /// kill -9 of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_member(i);
        self.wait_healthy(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn health(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.take(64 * 1024).read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// A loopback TCP proxy to one etcd member, which can cut every connection through it and
/// refuse new ones (a network partition), then let them through again.
pub struct Proxy {
    /// Port llmd connects to.
    pub port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        let mut p = Proxy {
            port: free_port(),
            target,
            task: None,
        };
        p.restore().await;
        p
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Accepts connections again.
    pub async fn restore(&mut self) {
        self.cut();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("proxy bind: {e}"),
            }
        };
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Dropping the set (when the task is aborted) aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
