//! Starting and stopping the real `llmd` binary.

use llmd_client::Client;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary (`llmd`, `llmctl`), built by `cargo build --workspace --bins`.
/// `LLMD_BIN_DIR` overrides the folder.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("LLMD_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test-binary> or target/<profile>/<bin> -> target/<profile>
            let exe = std::env::current_exe().expect("test binary path");
            let dir = exe.parent().expect("binary folder");
            if dir.ends_with("deps") {
                dir.parent().expect("target dir").to_path_buf()
            } else {
                dir.to_path_buf()
            }
        }
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Path of a system tool found on `PATH`; panics with what to install when it is missing.
pub fn tool_path(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: these tests need systemd's tools \
                 (`apt-get install systemd`; .ci/run installs them)"
            )
        })
}

/// How the `llmd` process is started.
#[derive(Debug, Clone, Default)]
enum Launch {
    /// `llmd` itself.
    #[default]
    Direct,
    /// `argv… llmd`: a wrapper that ends by exec-ing its last argument.
    Wrapped(Vec<String>),
    /// `systemd-socket-activate -l <socket> llmd`, which binds the socket and execs llmd
    /// (same pid) on the first connection.
    SocketActivated,
}

/// Configures a daemon before it starts.
pub struct DaemonBuilder {
    config: Option<String>,
    env: BTreeMap<String, String>,
    files: Vec<(PathBuf, String, u32)>,
    wait: bool,
    launch: Launch,
    socket_folder_mode: Option<u32>,
    journal_stream: bool,
}

impl Default for DaemonBuilder {
    fn default() -> Self {
        DaemonBuilder {
            config: None,
            env: BTreeMap::new(),
            files: Vec::new(),
            wait: true,
            launch: Launch::Direct,
            socket_folder_mode: None,
            journal_stream: false,
        }
    }
}

impl DaemonBuilder {
    /// Writes this config file (`$XDG_CONFIG_HOME/llmd/config.toml`). `{home}` is replaced
    /// by the temporary home folder.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    /// Writes a file relative to the home folder, with a mode, before the start.
    pub fn file(mut self, rel: &str, contents: &str, mode: u32) -> Self {
        self.files.push((rel.into(), contents.into(), mode));
        self
    }

    /// Do not wait for the socket (for tests that expect a failed start).
    pub fn no_wait(mut self) -> Self {
        self.wait = false;
        self
    }

    /// Starts llmd through `argv`, a wrapper that gets the llmd path as its last argument
    /// and must exec it (so the pid stays llmd's). `{home}` is replaced in every argument.
    pub fn wrapped(mut self, argv: &[&str]) -> Self {
        self.launch = Launch::Wrapped(argv.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Starts llmd socket-activated: `systemd-socket-activate` binds the socket in a folder
    /// created with `folder_mode` (the socket itself gets the tool's fixed 0644; chmod it to
    /// play another `SocketMode=`), and execs llmd on the first connection, with the whole
    /// test environment passed on.
    pub fn socket_activated(mut self, folder_mode: u32) -> Self {
        tool_path("systemd-socket-activate");
        self.launch = Launch::SocketActivated;
        self.socket_folder_mode = Some(folder_mode);
        self
    }

    /// Sets `JOURNAL_STREAM` to the `device:inode` of the daemon's stderr (its log file), as
    /// systemd does when stderr is the journal.
    pub fn journal_stream(mut self) -> Self {
        self.journal_stream = true;
        self
    }

    /// Starts the daemon in a fresh temporary home.
    pub fn start(self) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().to_path_buf();
        let run = home.join("run");
        std::fs::create_dir_all(&run).expect("run dir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod run");
        let config_dir = home.join("config").join("llmd");
        std::fs::create_dir_all(&config_dir).expect("config dir");
        if let Some(c) = &self.config {
            std::fs::write(
                config_dir.join("config.toml"),
                c.replace("{home}", &home.to_string_lossy()),
            )
            .expect("config");
        }
        for (rel, contents, mode) in &self.files {
            let p = home.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
                // llmd's own folders are private, as llmd makes them: a 0755 state folder
                // would keep the usage ledger off in every test that seeds a login.
                if rel.starts_with("state/") {
                    for dir in parent
                        .ancestors()
                        .take_while(|d| d.starts_with(home.join("state")))
                    {
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                            .expect("chmod state folder");
                    }
                }
            }
            std::fs::write(&p, contents.replace("{home}", &home.to_string_lossy()))
                .expect("write file");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).expect("chmod");
        }
        let socket = run.join("llmd").join("llmd.sock");
        if let Some(mode) = self.socket_folder_mode {
            let folder = socket.parent().expect("socket folder");
            std::fs::create_dir_all(folder).expect("socket folder");
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(mode))
                .expect("chmod socket folder");
        }
        let mut d = Daemon {
            child: None,
            dir,
            home: home.clone(),
            socket,
            env: self.env,
            launch: self.launch,
            journal_stream: self.journal_stream,
        };
        d.spawn(self.wait);
        d
    }
}

/// A running `llmd` in its own temporary home.
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Temporary home (also holds XDG folders).
    pub home: PathBuf,
    /// Socket path.
    pub socket: PathBuf,
    env: BTreeMap<String, String>,
    launch: Launch,
    journal_stream: bool,
}

impl Daemon {
    /// A builder.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// Starts a daemon with `config`.
    pub fn start(config: &str) -> Daemon {
        Daemon::builder().config(config).start()
    }

    /// The environment every process of this test sees (daemon and llmctl).
    pub fn base_env(&self) -> Vec<(String, String)> {
        let h = self.home.to_string_lossy().to_string();
        let mut v = vec![
            ("HOME".into(), h.clone()),
            ("XDG_RUNTIME_DIR".into(), format!("{h}/run")),
            ("XDG_CONFIG_HOME".into(), format!("{h}/config")),
            ("XDG_STATE_HOME".into(), format!("{h}/state")),
            ("LLMD_LOG".into(), "debug".into()),
        ];
        v.extend(
            self.env
                .iter()
                .map(|(k, val)| (k.clone(), val.replace("{home}", &h))),
        );
        v
    }

    fn command(&self, bin: &str) -> Command {
        self.command_at(&bin_path(bin))
    }

    fn command_at(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_clear();
        c.env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in self.base_env() {
            c.env(k, v);
        }
        c
    }

    fn launch_command(&self) -> Command {
        let llmd = bin_path("llmd");
        let home = self.home.to_string_lossy().to_string();
        match &self.launch {
            Launch::Direct => self.command_at(&llmd),
            Launch::Wrapped(argv) => {
                let argv: Vec<String> = argv.iter().map(|a| a.replace("{home}", &home)).collect();
                let mut c = self.command_at(Path::new(&argv[0]));
                c.args(&argv[1..]).arg(&llmd);
                c
            }
            Launch::SocketActivated => {
                // systemd-socket-activate passes on only the variables named with -E.
                let mut script = String::from("exec \"$0\" -l \"$1\"");
                if self.journal_stream {
                    script.push_str(" -E JOURNAL_STREAM");
                }
                for (k, _) in self.base_env() {
                    script.push_str(&format!(" -E {k}"));
                }
                script.push_str(" \"$2\"");
                let mut c = self.command_at(Path::new("/bin/sh"));
                c.arg("-c")
                    .arg(script)
                    .arg(tool_path("systemd-socket-activate"))
                    .arg(&self.socket)
                    .arg(&llmd);
                c
            }
        }
    }

    /// The daemon's pid (also the wrapper's: wrappers exec llmd).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self, wait: bool) {
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut command = self.launch_command();
        if self.journal_stream {
            use std::os::unix::fs::MetadataExt;
            let meta = log.metadata().expect("log metadata");
            command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn llmd");
        self.child = Some(child);
        if wait {
            self.wait_ready();
        }
    }

    /// Waits until the socket answers.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // Served, not just bound: the socket takes connections before the profiles
            // are loaded, and a test that changes a login file right after the start must
            // not race the first read.
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.socket) {
                use std::io::{BufRead, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let asked = s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"status\"}\n");
                let mut line = String::new();
                if asked.is_ok()
                    && std::io::BufReader::new(s)
                        .read_line(&mut line)
                        .is_ok_and(|n| n > 0)
                {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("llmd exited early with {status}; log:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "llmd did not open {} in time; log:\n{}",
            self.socket.display(),
            self.logs()
        );
    }

    /// kill -9: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again in the same home (after [`kill`](Self::kill)).
    pub fn start_again(&mut self) {
        self.kill();
        self.spawn(true);
    }

    /// Restarts the daemon in the same home.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(true);
    }

    /// Where the daemon's stdout/stderr go.
    pub fn log_path(&self) -> PathBuf {
        self.home.join("llmd.log")
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        Client::connect_to(&self.socket).await.expect("connect")
    }

    /// Runs `llmctl` against this daemon.
    pub fn llmctl(&self, args: &[&str]) -> Output {
        self.command("llmctl")
            .env("LLMD_SOCKET", &self.socket)
            .args(args)
            .output()
            .expect("run llmctl")
    }

    /// An `llmctl` command in this daemon's environment but without `LLMD_SOCKET`, for
    /// tests of how llmctl finds the socket.
    pub fn llmctl_command(&self) -> Command {
        self.command("llmctl")
    }

    /// An `llmd` command in this daemon's environment (for `--check-config`, `--socket`).
    pub fn llmd_command(&self) -> Command {
        self.command("llmd")
    }

    /// Runs `llmctl` with `stdin` piped in.
    pub fn llmctl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command("llmctl")
            .env("LLMD_SOCKET", &self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn llmctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("llmctl output")
    }

    /// Runs a second `llmd` in the same home (foreground) and returns its output.
    pub fn run_another(&self, extra_env: &[(&str, &str)]) -> Output {
        let mut c = self.command("llmd");
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.output().expect("run llmd")
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill with a pid we spawned.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Stops with SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The temporary folder (kept alive as long as the daemon).
    pub fn tempdir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
