//! Cluster mode against a real 3-member etcd cluster on 127.0.0.1: three llmd instances
//! share one rotating login (3-second tokens, single-use refresh tokens) while the owner is
//! killed, paused past its lease, an etcd member dies and one llmd is cut off from etcd.
//! `LLMD_CLUSTER_SECS` makes the agents loop longer (default 60 s, the CI variant).

use llmd_client::Client;
use llmd_proto::methods::ClusterStatus;
use llmd_tests::etcd::{etcd_binary, EtcdCluster, Proxy};
use llmd_tests::fake_oauth::{access_of, presented_refresh_tokens, refresh_of, FakeOAuth};
use llmd_tests::Daemon;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LEASE_SECS: u64 = 2;
/// Ownership must pass within the lease plus this.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(6);
const SEAL_KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// llmd keeps expiries in whole seconds, taken when the answer arrives: on a loaded machine
/// its idea of an expiry can be up to a second later than the authority's milliseconds.
const CLOCK_SLACK_MS: i64 = 1000;

fn bundle(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({"access_token": access, "refresh_token": refresh, "expires_at": expires_at}).to_string()
}

fn config(fake: &FakeOAuth, name: &str, endpoints: &[String]) -> String {
    let etcd: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
[cluster]
etcd = [{}]
name = "{name}"
prefix = "/llmd/test/"
lease_secs = {LEASE_SECS}
seal_key_file = "{{home}}/seal.key"

[profiles.shared]
provider = "anthropic"
auth = "oauth"
token_endpoint = "{}"
cluster = true
"#,
        etcd.join(", "),
        fake.anthropic_url()
    )
}

fn start_node(fake: &FakeOAuth, name: &str, endpoints: &[String], planted: Option<&str>) -> Daemon {
    let mut b = Daemon::builder()
        .config(&config(fake, name, endpoints))
        .file("seal.key", SEAL_KEY_HEX, 0o600);
    if let Some(p) = planted {
        b = b.file("state/llmd/oauth/shared.json", p, 0o600);
    }
    b.start()
}

async fn cluster_status(d: &Daemon) -> Option<ClusterStatus> {
    profile_cluster_status(d, "shared").await
}

async fn profile_cluster_status(d: &Daemon, profile: &str) -> Option<ClusterStatus> {
    let c = tokio::time::timeout(Duration::from_secs(2), Client::connect_to(&d.socket))
        .await
        .ok()?
        .ok()?;
    let s = tokio::time::timeout(Duration::from_secs(2), c.status())
        .await
        .ok()?
        .ok()?;
    s.profiles.into_iter().find(|p| p.name == profile)?.cluster
}

/// Waits until one of `nodes` (by index, skipping `except`) reports itself owner.
async fn wait_owner(nodes: &[Daemon], except: Option<usize>, within: Duration) -> usize {
    wait_profile_owner(nodes, "shared", except, within).await
}

async fn wait_profile_owner(
    nodes: &[Daemon],
    profile: &str,
    except: Option<usize>,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for (i, d) in nodes.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            if profile_cluster_status(d, profile)
                .await
                .is_some_and(|c| c.role == "owner")
            {
                return i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no instance took over the login within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all_logs(nodes: &[Daemon]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, d)| format!("--- node{i}:\n{}", d.logs()))
        .collect()
}

/// What one agent saw.
#[derive(Default)]
struct Served {
    /// Tokens served, with when they were asked for (unix ms).
    ok: Vec<(String, i64)>,
    errors: u64,
}

fn agent(socket: std::path::PathBuf, stop: Arc<AtomicBool>, out: Arc<Mutex<Served>>) {
    tokio::spawn(async move {
        let mut client: Option<Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if client.is_none() {
                client = tokio::time::timeout(Duration::from_secs(1), Client::connect_to(&socket))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            if let Some(c) = &client {
                let asked_ms = now_ms();
                match tokio::time::timeout(Duration::from_secs(2), c.token("shared", Some(1))).await
                {
                    Ok(Ok(t)) => out.lock().unwrap().ok.push((t.token.clone(), asked_ms)),
                    Ok(Err(llmd_client::Error::Rpc(_))) => out.lock().unwrap().errors += 1,
                    _ => {
                        out.lock().unwrap().errors += 1;
                        client = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_one_login_through_crashes_pauses_and_partitions() {
    let Some(bin) = etcd_binary() else {
        eprintln!("SKIP: `etcd` is not installed (Debian: apt-get install etcd-server)");
        return;
    };
    let total = Duration::from_secs(
        std::env::var("LLMD_CLUSTER_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let mut etcd = tokio::task::block_in_place(|| EtcdCluster::start(bin));
    let fake = FakeOAuth::start(3).await;
    let direct = etcd.endpoints();
    // Node 2 reaches etcd only through proxies, so it can be cut off.
    let mut proxies = Vec::new();
    for port in etcd.client_ports() {
        proxies.push(Proxy::start(port).await);
    }
    let proxied: Vec<String> = proxies
        .iter()
        .map(|p| format!("http://127.0.0.1:{}", p.port))
        .collect();
    let planted_expiry = now() + 3;
    let planted = bundle(&access_of(0), &refresh_of(0), planted_expiry);
    let mut nodes =
        tokio::task::block_in_place(|| vec![start_node(&fake, "node0", &direct, Some(&planted))]);
    // Node 0 shares its login; the others start without one and adopt it from etcd.
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster_status(&nodes[0])
        .await
        .is_none_or(|c| c.revision <= 0)
    {
        assert!(
            Instant::now() < deadline,
            "node0 never shared its login: {}",
            nodes[0].logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| {
        nodes.push(start_node(&fake, "node1", &direct, None));
        nodes.push(start_node(&fake, "node2", &proxied, None));
    });

    let stop = Arc::new(AtomicBool::new(false));
    let served: Vec<Arc<Mutex<Served>>> = (0..3).map(|_| Arc::default()).collect();
    for (d, out) in nodes.iter().zip(&served) {
        agent(d.socket.clone(), stop.clone(), out.clone());
    }
    let started = Instant::now();
    let takeover = Duration::from_secs(LEASE_SECS) + TAKEOVER_MARGIN;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut round = 0;
    loop {
        round += 1;
        // 1. kill -9 of the owner, which is started again later.
        let owner = wait_owner(&nodes, None, takeover).await;
        let t0 = Instant::now();
        tokio::task::block_in_place(|| nodes[owner].kill());
        let next = wait_owner(&nodes, Some(owner), takeover).await;
        eprintln!(
            "round {round}: node{owner} killed; node{next} owns the login after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::block_in_place(|| nodes[owner].start_again());
        // Its agent reconnects by itself.
        tokio::time::sleep(Duration::from_secs(3)).await;

        // 2. SIGSTOP of the owner past its lease, then SIGCONT: the fence must hold.
        let owner = wait_owner(&nodes, None, takeover).await;
        let t0 = Instant::now();
        nodes[owner].signal(libc::SIGSTOP);
        let next = wait_owner(&nodes, Some(owner), takeover).await;
        eprintln!(
            "round {round}: node{owner} paused; node{next} owns the login after {:?}",
            t0.elapsed()
        );
        // Let the new owner rotate the login under the paused one. When the pause caught
        // the old owner inside a refresh (its intent to spend the token is in etcd, its
        // result is not), the new owner must wait for it instead of spending the same
        // refresh token again: then the refresh comes once the old owner runs again.
        let generation = fake.generation();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut waited_for_paused = false;
        while fake.generation() == generation {
            if Instant::now() >= deadline {
                waited_for_paused = nodes[next]
                    .logs()
                    .contains(&format!("node{owner} refreshed this login"));
                assert!(
                    waited_for_paused,
                    "the new owner never refreshed: {}",
                    all_logs(&nodes)
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        nodes[owner].signal(libc::SIGCONT);
        if waited_for_paused {
            eprintln!("round {round}: node{next} waited for node{owner}'s unfinished refresh");
            let deadline = Instant::now() + Duration::from_secs(15);
            while fake.generation() == generation {
                assert!(
                    Instant::now() < deadline,
                    "the paused owner's refresh never finished: {}",
                    all_logs(&nodes)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(4)).await;

        // 3. One etcd member dies (quorum stays), and comes back.
        tokio::task::block_in_place(|| etcd.kill(round % 3));
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::block_in_place(|| etcd.restart(round % 3));
        tokio::time::sleep(Duration::from_secs(2)).await;

        // 4. Node 2 is cut off from etcd: it reports why, and never refreshes on its own.
        let rotations_before = fake.state().rotations;
        for p in proxies.iter_mut() {
            p.cut();
        }
        let deadline = Instant::now() + takeover;
        loop {
            let c = cluster_status(&nodes[2]).await;
            if let Some(c) = c.filter(|c| c.role == "disconnected") {
                assert!(c.error.is_some(), "a disconnected instance says why");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node2 never noticed it was cut off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let owner = wait_owner(&nodes, Some(2), takeover).await;
        eprintln!("round {round}: node2 cut off; node{owner} owns the login");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            fake.state().rotations > rotations_before,
            "the others kept the login fresh"
        );
        for p in proxies.iter_mut() {
            p.restore().await;
        }
        // Node 2 adopts the current login again.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let current = access_of(fake.generation());
            let fresh = served[2].lock().unwrap().ok.last().is_some_and(|(t, _)| {
                *t == current
                    || fake
                        .state()
                        .expiry_ms_of
                        .get(t)
                        .is_some_and(|e| *e > now_ms())
            });
            let connected = cluster_status(&nodes[2])
                .await
                .is_some_and(|c| c.role != "disconnected");
            if fresh && connected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node2 did not catch up after the partition: {}",
                nodes[2].logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if started.elapsed() >= total {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The authority's view: zero invalid_grant, no refresh token presented twice.
    {
        let state = fake.state();
        assert_eq!(
            state.invalid_grants,
            0,
            "an instance spent a stale refresh token: {}",
            all_logs(&nodes)
        );
        let presented = presented_refresh_tokens(&state);
        let unique: HashSet<&String> = presented.iter().collect();
        assert_eq!(
            unique.len(),
            presented.len(),
            "a refresh token was presented twice: {presented:?}"
        );
        assert!(
            state.rotations >= 10,
            "the login rotated only {} times",
            state.rotations
        );
        // Every token an agent was served was valid when served.
        for (i, s) in served.iter().enumerate() {
            let s = s.lock().unwrap();
            assert!(!s.ok.is_empty(), "agent {i} was never served a token");
            for (token, at) in &s.ok {
                let expiry = if *token == access_of(0) {
                    Some(planted_expiry * 1000)
                } else {
                    state.expiry_ms_of.get(token).copied()
                };
                let expiry = expiry.unwrap_or_else(|| {
                    panic!("agent {i} was served a token the authority never issued")
                });
                assert!(
                    *at < expiry + CLOCK_SLACK_MS,
                    "agent {i} was served an expired token (asked at {at} ms, expired at {expiry} ms)"
                );
            }
            eprintln!(
                "agent {i}: {} tokens served, {} errors",
                s.ok.len(),
                s.errors
            );
        }
    }
    // The status of a shared login names the owner and the revision.
    let owner = wait_owner(&nodes, None, takeover).await;
    let c = cluster_status(&nodes[owner]).await.expect("status");
    assert_eq!(c.owner.as_deref(), Some(format!("node{owner}").as_str()));
    assert!(c.revision > 0 && c.lease_remaining_ms.is_some());
    let other = (owner + 1) % 3;
    let c = cluster_status(&nodes[other]).await.expect("status");
    assert_eq!(c.role, "follower");
    assert_eq!(c.owner.as_deref(), Some(format!("node{owner}").as_str()));
    drop(proxies);
    drop(etcd);
}

/// etcd never sees a token in clear: neither in what a watch of the prefix delivers nor
/// anywhere in the members' data folders (WAL, snapshots, bbolt database).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_never_holds_a_token_in_clear() {
    let Some(bin) = etcd_binary() else {
        eprintln!("SKIP: `etcd` is not installed (Debian: apt-get install etcd-server)");
        return;
    };
    let mut etcd = tokio::task::block_in_place(|| EtcdCluster::start(bin));
    let fake = FakeOAuth::start(3).await;
    let endpoints = etcd.endpoints();
    let watcher = {
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let mut client = etcd_client::Client::connect(endpoints, None)
                .await
                .expect("etcd client");
            let mut stream = client
                .watch(
                    "/llmd/",
                    Some(etcd_client::WatchOptions::new().with_prefix()),
                )
                .await
                .expect("watch");
            let mut values: Vec<(String, Vec<u8>)> = Vec::new();
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        values.push((
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.value().to_vec(),
                        ));
                    }
                }
                if values.iter().filter(|(k, _)| k.ends_with("/login")).count() >= 4 {
                    break;
                }
            }
            values
        })
    };
    let planted = bundle(&access_of(0), &refresh_of(0), now() + 3);
    let started = Instant::now();
    let mut node =
        tokio::task::block_in_place(|| start_node(&fake, "node0", &endpoints, Some(&planted)));
    let values = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the login was written to etcd and rotated")
        .expect("watch task");
    let t0 = Instant::now();
    tokio::task::block_in_place(|| {
        node.stop();
        eprintln!("llmd stopped in {:?}", t0.elapsed());
        for i in 0..3 {
            etcd.kill(i);
        }
    });
    eprintln!("etcd stopped; {:?} since llmd started", started.elapsed());
    let generation = fake.generation();
    assert!(generation >= 3, "the login rotated through etcd");
    let secrets: Vec<String> = (0..=generation + 1)
        .flat_map(|g| [access_of(g), refresh_of(g)])
        .collect();
    for (key, value) in &values {
        for s in &secrets {
            assert!(
                !contains(value, s.as_bytes()),
                "the watch of {key} delivered a token in clear"
            );
        }
    }
    // The scan reads what etcd stored: the key names are there in clear, the tokens not.
    let mut files = Vec::new();
    collect_files(etcd.data_dir(), &mut files);
    let mut key_seen = false;
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        key_seen |= contains(&bytes, b"/llmd/test/shared/login");
        // Every planted token starts so: one pass per file, then the exact ones.
        if !contains(&bytes, b"sk-ant-o") {
            continue;
        }
        for s in &secrets {
            assert!(
                !contains(&bytes, s.as_bytes()),
                "{} holds a token in clear",
                f.display()
            );
        }
    }
    assert!(
        key_seen,
        "the scan did not find the login's key in etcd's data ({} files)",
        files.len()
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn claude_creds(access: &str, refresh: &str, expires_at: i64) -> String {
    json!({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh,
        "expiresAt": expires_at * 1000, "scopes": ["user:inference", "user:profile"],
        "subscriptionType": "max"}})
    .to_string()
}

fn claude_node(fake: &FakeOAuth, name: &str, endpoints: &[String], creds: Option<&str>) -> Daemon {
    let etcd: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let config = format!(
        "[cluster]\netcd = [{}]\nname = \"{name}\"\nprefix = \"/llmd/test/\"\nlease_secs = {LEASE_SECS}\nseal_key_file = \"{{home}}/seal.key\"\n\n[profiles.claude]\nprovider = \"anthropic\"\nauth = \"claude-cli\"\ntoken_endpoint = \"{}\"\ncluster = true\n",
        etcd.join(", "),
        fake.anthropic_url()
    );
    let mut b = Daemon::builder()
        .config(&config)
        .file("seal.key", SEAL_KEY_HEX, 0o600);
    if let Some(c) = creds {
        b = b.file(".claude/.credentials.json", c, 0o600);
    }
    b.start()
}

fn file_access(d: &Daemon) -> Option<String> {
    let text = std::fs::read_to_string(d.home.join(".claude/.credentials.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["claudeAiOauth"]["accessToken"]
        .as_str()
        .map(str::to_owned)
}

async fn wait_file(d: &Daemon, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while file_access(d).as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{want} never reached {}: {}",
            d.home.display(),
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claude Code on every host: a `claude-cli` login is written into each host's
/// `.credentials.json`, and a refresh Claude Code does itself on one host reaches the
/// others, so the owner's next refresh spends the right refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claude_code_on_every_host_shares_one_login() {
    let Some(bin) = etcd_binary() else {
        eprintln!("SKIP: `etcd` is not installed (Debian: apt-get install etcd-server)");
        return;
    };
    let etcd = tokio::task::block_in_place(|| EtcdCluster::start(bin));
    // Long-lived tokens: only the refreshes this test causes happen.
    let fake = FakeOAuth::start(3600).await;
    let endpoints = etcd.endpoints();
    let creds = claude_creds(&access_of(0), &refresh_of(0), now() + 3600);
    let nodes = tokio::task::block_in_place(|| {
        let first = claude_node(&fake, "node0", &endpoints, Some(&creds));
        vec![first]
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while profile_cluster_status(&nodes[0], "claude")
        .await
        .is_none_or(|c| c.revision <= 0)
    {
        assert!(
            Instant::now() < deadline,
            "node0 never shared its login: {}",
            nodes[0].logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut nodes = nodes;
    nodes.push(tokio::task::block_in_place(|| {
        claude_node(&fake, "node1", &endpoints, None)
    }));
    // The host without a login gets Claude Code's file from the cluster.
    wait_file(&nodes[1], &access_of(0)).await;

    // Claude Code refreshes by itself on node 1 (temp file and rename, as it does).
    let (access, refresh, _) = fake.rotate_out_of_band();
    let path = nodes[1].home.join(".claude/.credentials.json");
    let tmp = nodes[1].home.join(".claude/.credentials.json.tmp");
    std::fs::write(&tmp, claude_creds(&access, &refresh, now() + 3600)).expect("write");
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::fs::rename(&tmp, &path).expect("rename");
    wait_file(&nodes[0], &access).await;

    // The owner's next refresh spends Claude Code's new refresh token, and both hosts get
    // the result.
    let owner = wait_profile_owner(&nodes, "claude", None, Duration::from_secs(10)).await;
    let c = Client::connect_to(&nodes[owner].socket)
        .await
        .expect("connect");
    let t = c
        .refresh("claude")
        .await
        .expect("refresh through the owner");
    let newest = access_of(fake.generation());
    assert_eq!(t.token, newest);
    for d in &nodes {
        wait_file(d, &newest).await;
    }
    assert_eq!(
        fake.invalid_grants(),
        0,
        "a spent refresh token was used: {}",
        all_logs(&nodes)
    );
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(nodes[0].home.join(".claude/.credentials.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(
        v["claudeAiOauth"]["subscriptionType"], "max",
        "Claude Code's other fields stay"
    );
}
